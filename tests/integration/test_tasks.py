"""One-off tasks, the submit contract, routing and resume, on the process runtime and real Podman and Docker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.stack import API_KEY, Stack, parse_sse, runtimes, stack_fixture
from tests.waiting import wait_until


@pytest.fixture(params=runtimes())
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async for opened in stack_fixture(request.param, {"GPUD_CLIENT_GONE_GRACE_SECONDS": "1"}):
        yield opened


def finish_of(events: list) -> dict:
    assert events[-1].event == "task_finish", [e.event for e in events]
    return events[-1].data


async def test_oneoff_success_streams_stdout_and_removes_the_container(stack: Stack) -> None:
    events = await stack.run(stack.body("oneoff", metadata={"prompt": "one two three"}))
    names = [e.event for e in events]
    assert names[0] == "connection" and events[0].data["status"] == "gpu_allocated"
    assert [e.data["status"] for e in events if e.event == "worker"][-2:] == ["created", "working"]
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert all(e.data["task_id"] == events[0].data["task_id"] for e in events)
    text = next(e for e in events if e.event == "text").data["text"]
    assert "".join(e.data["delta"] for e in events if e.event == "text_delta") == text
    assert "one" in text
    assert any(e.event == "logs" and e.data["stream"] == "stderr" for e in events)
    assert finish_of(events)["status"] == "completed" and finish_of(events)["exit_code"] == 0
    # The GPU is free at task_finish (the container exited); the container goes just after.
    assert stack.services.scheduler.leases() == []
    await stack.all_removed()


async def test_oneoff_failure_reports_exit_code_and_log_tail(stack: Stack) -> None:
    events = await stack.run(stack.body("oneoff", metadata={"exit_code": 7}))
    finish = finish_of(events)
    assert finish["status"] == "failed" and finish["exit_code"] == 7
    assert finish["error"]["code"] == "worker_failed" and "last log lines" in finish["error"]["message"]
    await stack.all_removed()


async def test_oneoff_timeout_kills_the_worker(stack: Stack) -> None:
    events = await stack.run(stack.body("oneoff", metadata={"sleep": 60}, timeout_seconds=1))
    finish = finish_of(events)
    assert finish["status"] == "timeout" and finish["elapsed_seconds"] < 30
    assert stack.services.scheduler.leases() == []
    await stack.all_removed()


async def test_difficulty_routing_and_503_when_no_gpu_is_free(stack: Stack) -> None:
    slow = stack.body("oneoff", task_difficulty="low", metadata={"sleep": 30})
    first = await stack.submit(slow)
    assert first.status == 200
    # GPU 0 is the only low GPU: a second low task is refused before any work, the high GPU stays free.
    second = await stack.submit(slow)
    assert second.status == 503 and second.headers["Retry-After"]
    assert (await second.json())["error"]["code"] == "no_gpu_available"
    events = await stack.run(stack.body("oneoff", task_difficulty="high", metadata={"prompt": "hi"}))
    assert events[0].data["gpu_id"] == 1 and finish_of(events)["status"] == "completed"
    task_id = parse_sse((await first.content.readuntil(b"\n\n")).decode())[0].data["task_id"]
    status, body = await stack.call("DELETE", f"/api/tasks/{task_id}")
    assert status == 200
    rest = parse_sse(await first.text())
    assert finish_of(rest)["status"] == "cancelled"
    _, task = await stack.get(f"/api/tasks/{task_id}")
    assert task["gpu_id"] == 0 and task["status"] == "cancelled"


async def test_errors_before_work_are_plain_json(stack: Stack) -> None:
    cases = [
        ({"task_type": "oneoff"}, 400, "invalid_model_id"),
        (stack.body("oneoff", timeout_seconds=10**9), 400, "invalid_timeout_seconds"),
        (stack.body("oneoff", task_difficulty="medium"), 400, "invalid_task_difficulty"),
        ({**stack.body("oneoff"), "model_id": "nope"}, 404, "model_not_found"),
        (stack.body("oneoff", preset="nope"), 404, "preset_not_found"),
        (stack.body("session", preset="oneoff"), 400, "invalid_task_type"),
        (stack.body("session", session_id="0" * 32), 404, "session_not_found"),
    ]
    for body, status, code in cases:
        async with await stack.submit(body) as response:
            assert response.status == status, (body, await response.text())
            assert (await response.json())["error"]["code"] == code
    async with stack.session.post(
        f"{stack.url}/api/tasks/submit", data=b"{not json", headers={"X-API-Key": API_KEY}
    ) as response:
        assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_json"
    assert await stack.containers() == []
    assert stack.services.scheduler.leases() == []


async def test_disconnect_and_resume_with_last_event_id(stack: Stack) -> None:
    response = await stack.submit(stack.body("session", metadata={"max_tokens": 30, "delay": 0.03}))
    first: list = []
    while len(first) < 6:
        first += parse_sse((await response.content.readuntil(b"\n\n")).decode())
    response.close()  # the client goes away mid-task
    task_id = first[0].data["task_id"]

    async def went_on_without_the_client() -> dict | None:
        _, task = await stack.get(f"/api/tasks/{task_id}")
        return task if task["clients"] == 0 and task["events"] > first[-1].id else None

    # gpud noticed the client is gone and the task logged events it missed: the resume must replay them.
    await wait_until(went_on_without_the_client, "the task to go on without its client")
    headers = {"X-API-Key": API_KEY, "Last-Event-ID": str(first[-1].id)}
    async with stack.session.get(f"{stack.url}/api/tasks/{task_id}/events", headers=headers) as again:
        rest = parse_sse(await again.text())
    ids = [e.id for e in first + rest]
    assert ids == list(range(1, len(ids) + 1)), "no event lost, none duplicated"
    assert finish_of(rest)["status"] == "completed"
    # After the end the whole log replays for the retention period.
    async with stack.session.get(f"{stack.url}/api/tasks/{task_id}/events", headers={"X-API-Key": API_KEY}) as full:
        assert [e.id for e in parse_sse(await full.text())] == ids


async def test_task_whose_clients_are_gone_is_cancelled_after_grace(stack: Stack) -> None:
    response = await stack.submit(stack.body("oneoff", metadata={"sleep": 60}))
    task_id = parse_sse((await response.content.readuntil(b"\n\n")).decode())[0].data["task_id"]
    response.close()

    async def ended() -> dict | None:
        _, task = await stack.get(f"/api/tasks/{task_id}")
        return task if task["status"] not in ("queued", "running") else None

    task = await wait_until(ended, "the abandoned task to end")
    assert task["status"] == "cancelled" and task["error"]["code"] == "client_gone"

    async def no_containers() -> bool:
        return await stack.containers() == []

    await wait_until(no_containers, "the task's container to be removed", timeout=5)


async def test_list_and_show_tasks(stack: Stack) -> None:
    events = await stack.run(stack.body("oneoff", metadata={"prompt": "listed"}))
    task_id = events[0].data["task_id"]
    status, listing = await stack.get("/api/tasks")
    assert status == 200 and task_id in [t["task_id"] for t in listing["tasks"]]
    _, task = await stack.get(f"/api/tasks/{task_id}")
    assert task["status"] == "completed" and "listed" in task["text"] and task["task_type"] == "oneoff"
    status, body = await stack.call("DELETE", f"/api/tasks/{task_id}")
    assert status == 409 and body["error"]["code"] == "task_finished"


async def test_disallowed_image_is_403_and_creates_no_container(stack: Stack) -> None:
    for task_type in ("oneoff", "session"):
        async with await stack.submit(stack.body(task_type, preset="blocked")) as response:
            assert response.status == 403
            error = (await response.json())["error"]
            assert error["code"] == "image_not_allowed" and "not-on-the-list:1" in error["message"]
    assert await stack.containers() == [] and stack.services.scheduler.leases() == []


@pytest.mark.parametrize("engine", ["podman", "docker"])
async def test_engine_down_is_503_and_health_degraded(engine: str) -> None:
    if engine not in runtimes():
        pytest.skip(f"{engine} not selected by GPUD_TEST_RUNTIMES")
    async for stack in stack_fixture(engine, {"GPUD_RUNTIME_SOCKET": "/tmp/gpud-no-engine-here.sock"}):
        async with await stack.submit(stack.body("oneoff")) as response:
            assert response.status == 503 and response.headers["Retry-After"]
            assert (await response.json())["error"]["code"] == "engine_unavailable"
        async with stack.session.get(f"{stack.url}/health") as response:
            health = await response.json()
        assert response.status == 503 and health["status"] == "degraded"
        assert health["runtime"]["reachable"] is False and "engine unreachable" in health["reasons"][0]
        assert stack.services.scheduler.leases() == []


async def test_allowed_but_missing_image_fails_the_task_naming_the_image(stack: Stack) -> None:
    if stack.runtime_name == "process":
        pytest.skip("the process runtime runs no images")
    for task_type in ("oneoff", "session"):
        events = await stack.run(stack.body(task_type, preset="missing"))
        finish = finish_of(events)
        assert finish["status"] == "failed" and finish["error"]["code"] == "image_unavailable"
        assert "127.0.0.1:9/gpud-worker-python:never-built" in finish["error"]["message"]
        assert "scripts/build-images.sh" in finish["error"]["message"]
    assert await stack.containers() == [] and stack.services.scheduler.leases() == []
