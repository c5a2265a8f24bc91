"""The public app's contract over real HTTP: API keys, body limits, JSON errors, /health, /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gpud.api.app import make_public_app
from tests.integration.stack import API_KEY, Stack, stack_fixture


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    env = {"INTERNAL_API_KEY": f"{API_KEY},second-key", "GPUD_MAX_REQUEST_BYTES": "4096"}
    async for opened in stack_fixture("process", env):
        yield opened


UNAUTHORIZED = "missing or invalid API key (send X-API-Key: <key> or Authorization: Bearer <key>)"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": ""},
        {"X-API-Key": "wrong"},
        {"X-API-Key": API_KEY + "x"},
        {"X-API-Key": "k" * 4000},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
        {"X-API-Key": "wrong", "Authorization": f"Bearer {API_KEY}"},
    ],
    ids=[
        "missing", "empty", "wrong", "prefix", "oversized", "bearer-wrong", "bearer-no-key", "bearer-prefix",
        "basic", "no-scheme", "x-api-key-wins",
    ],
)  # fmt: skip
async def test_every_bad_key_gets_the_same_401(stack: Stack, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/api/tasks"), ("POST", "/api/tasks/submit"), ("GET", "/metrics")]:
        async with stack.session.request(method, f"{stack.url}{path}", headers=headers) as response:
            assert response.status == 401
            assert await response.json() == {"error": {"code": "unauthorized", "message": UNAUTHORIZED}}


@pytest.mark.parametrize(
    "send",
    [lambda key: {"X-API-Key": key}, lambda key: {"Authorization": f"Bearer {key}"}],
    ids=["x-api-key", "bearer"],
)
async def test_any_configured_key_is_accepted_either_way(stack: Stack, send: Callable[[str], dict[str, str]]) -> None:
    for key in (API_KEY, "second-key"):
        for path in ("/api/tasks", "/metrics"):
            async with stack.session.get(f"{stack.url}{path}", headers=send(key)) as response:
                assert response.status == 200
    # The scheme's name is case-insensitive (RFC 7235).
    async with stack.session.get(f"{stack.url}/api/tasks", headers={"Authorization": f"bearer {API_KEY}"}) as r:
        assert r.status == 200


async def test_health_needs_no_key_and_describes_the_host(stack: Stack) -> None:
    async with stack.session.get(f"{stack.url}/health") as response:
        assert response.status == 200
        health = await response.json()
    assert health["status"] == "ok" and health["reasons"] == []
    assert health["gpu_backend"] == "static" and health["uptime_seconds"] >= 0 and health["version"]
    assert health["runtime"] == {
        "name": "process",
        "reachable": True,
        "isolated": False,
        "version": health["runtime"]["version"],
        "detail": health["runtime"]["detail"],
    }
    assert [(g["id"], g["difficulty"], g["leased"]) for g in health["gpus"]] == [(0, "low", False), (1, "high", False)]
    assert set(health["gpus"][0]) >= {"uuid", "name", "memory", "utilization_percent", "leased_to"}
    assert health["active_sessions"] == 0 and health["active_tasks"] == 0


async def test_body_over_the_cap_is_413_and_malformed_json_is_400(stack: Stack) -> None:
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    async with stack.session.post(f"{stack.url}/api/tasks/submit", data=b"{" + b" " * 8000, headers=headers) as r:
        assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        async with stack.session.post(f"{stack.url}/api/tasks/submit", data=body, headers=headers) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"


async def test_unknown_route_and_method_keep_the_error_shape(stack: Stack) -> None:
    status, body = await stack.get("/api/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await stack.call("PUT", "/api/tasks")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


async def test_metrics_with_key(stack: Stack) -> None:
    await stack.get("/api/tasks")
    async with stack.session.get(f"{stack.url}/metrics", headers={"X-API-Key": API_KEY}) as response:
        text = await response.text()
    assert response.status == 200 and 'gpud_build_info{python="' in text
    assert 'gpud_http_requests_total{app="public",route="/api/tasks",status="200"}' in text


async def test_unexpected_error_is_a_logged_500_without_traceback(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_public_app(stack.services.for_api())

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app.router.add_get("/boom", boom)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with stack.session.get(server.make_url("/boom"), headers={"X-API-Key": API_KEY}) as response:
            body = await response.text()
    finally:
        await server.close()
    assert response.status == 500 and "secret" not in body and "Traceback" not in body
    assert "internal_error" in body and "secret internals" in caplog.text


async def test_metrics_are_derived_from_live_state(stack: Stack) -> None:
    events = await stack.run(stack.body("oneoff", metadata={"prompt": "m"}))
    assert events[-1].data["status"] == "completed"
    session = await stack.run(stack.body("session", metadata={"max_tokens": 1, "delay": 0}))
    assert session[-1].data["status"] == "completed"
    async with stack.session.get(f"{stack.url}/metrics", headers={"X-API-Key": API_KEY}) as response:
        text = await response.text()
    assert 'gpud_tasks_finished_total{status="completed",type="oneoff"} 1.0' in text
    assert 'gpud_tasks_finished_total{status="completed",type="session"} 1.0' in text
    assert 'gpud_task_duration_seconds_count{status="completed",type="oneoff"} 1.0' in text
    assert 'gpud_gpu_leased{difficulty="low",gpu="0",uuid="GPU-static-0"} 1.0' in text  # the live session
    assert 'gpud_gpu_leased{difficulty="high",gpu="1",uuid="GPU-static-1"} 0.0' in text
    assert 'gpud_sessions{state="ready"} 1.0' in text and 'gpud_tasks_retained{status="completed"} 2.0' in text
    assert "gpud_session_queued_tasks 0.0" in text
