"""/metrics over real HTTP from a real gpud: every series starts at 0, and after tasks the series hold what happened.

A `gpud run` (process runtime, the example workers) runs one-offs, session tasks, refused submissions, a crashing
one-off and session worker, a client that leaves, and a stuck worker that is restarted; each test scrapes /metrics
(with `Authorization: Bearer`, as Prometheus sends the key) and checks the counters, histograms and gauges against
what it did. `promtool check metrics` reads a live scrape without a word. Model fetches, cache evictions and image
pulls are checked on in-process stacks (a file service; a real Podman engine).
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import gpud
from tests.fileservice import FileService
from tests.integration.gpuctl_env import MODEL_ID, TOKENS, GpudHost, start_host
from tests.integration.stack import API_KEY, SSEEvent, Stack, parse_sse, stack_fixture
from tests.monitoring.shipped import require_tool
from tests.waiting import wait_for

KEY = "test-key"
BEARER = {"Authorization": f"Bearer {KEY}"}
REFUSAL_STATUSES = ("400", "401", "403", "404", "409", "410", "413", "429", "503")
SESSION_STATES = ("starting", "ready", "working", "stopping", "stopped", "failed")
FINAL = ("completed", "failed", "timeout", "cancelled")


class Scrape:
    """One /metrics answer: its text and every sample's value by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        """The sample's value, or None when the series is not exported."""
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def __getitem__(self, name: str) -> float | None:
        return self.value(name)


def scrape(host: GpudHost, admin: bool = False) -> Scrape:
    """GET /metrics with the key as a bearer token (public app), or over the admin socket."""
    status, text = host.daemon.request("GET", "/metrics", headers={} if admin else BEARER, admin=admin)
    assert status == 200, text
    return Scrape(text)


def run(host: GpudHost, **body: Any) -> list[SSEEvent]:
    """Submit a task of the host's model (a session task unless told) and read its whole stream."""
    submission = {"model_id": MODEL_ID, "task_type": "session", **body}
    status, text = host.daemon.request("POST", "/api/tasks/submit", submission, BEARER)
    assert status == 200, text
    return parse_sse(text)


def finish(events: list[SSEEvent]) -> dict[str, Any]:
    """The task_finish event's data."""
    assert events[-1].event == "task_finish", events[-1]
    return events[-1].data


@pytest.fixture(scope="module")
def host() -> Iterator[GpudHost]:
    started = start_host({"GPUD_CLIENT_GONE_GRACE_SECONDS": "1", "GPUD_MODEL_CACHE_MAX_BYTES": "1g"})
    yield started
    started.close()


def test_every_series_starts_at_zero_and_then_holds_what_happened(host: GpudHost) -> None:
    fresh = scrape(host)
    for status in REFUSAL_STATUSES:
        assert fresh.value("gpud_task_submissions_refused_total", status=status) == 0
    for state in SESSION_STATES:
        assert fresh.value("gpud_sessions", state=state) == 0
    for status in ("queued", "running"):
        assert fresh.value("gpud_tasks_active", status=status) == 0
    for status in FINAL:
        assert fresh.value("gpud_tasks_retained", status=status) == 0
        assert fresh.value("gpud_tasks_finished_total", type="oneoff", status=status) == 0
    for kind in ("oneoff", "session"):
        assert fresh.value("gpud_task_queue_wait_seconds_count", type=kind) == 0
        assert fresh.value("gpud_worker_crashes_total", type=kind) == 0
    assert fresh.value("gpud_gpu_seconds_total", model=MODEL_ID, tier="low") == 0  # the presets' models
    assert fresh.value("gpud_session_start_seconds_count", model=MODEL_ID) == 0
    assert fresh.value("gpud_image_pulls_total", result="failed") == 0
    assert "_created" not in fresh.text
    assert fresh.value("gpud_build_info", version=gpud.__version__, python=fresh_python(fresh)) == 1
    assert (fresh["process_resident_memory_bytes"] or 0) > 0 and (fresh["process_open_fds"] or 0) > 0
    assert (fresh["process_start_time_seconds"] or 0) > 0 and fresh["process_cpu_seconds_total"] is not None
    wait_for(lambda: scrape(host)["gpud_engine_up"] == 1, "the engine probe to set gpud_engine_up")

    oneoffs = [run(host, task_type="oneoff", task_preset="oneoff", metadata={"prompt": f"p {i}"}) for i in range(3)]
    assert [finish(events)["status"] for events in oneoffs] == ["completed"] * 3
    crashed = finish(run(host, task_type="oneoff", task_preset="oneoff", metadata={"exit_code": 137}))
    assert crashed["status"] == "failed" and crashed["exit_code"] == 137
    first = finish(run(host, task_type="session", task_preset="stream", task_difficulty="high"))
    warm = finish(run(host, task_preset="stream", session_id=session_of(host, first)))
    assert first["status"] == warm["status"] == "completed"
    refusals = [
        host.daemon.request("POST", "/api/tasks/submit", {"model_id": MODEL_ID, "task_preset": "oneoff"}, h)[0]
        for h in ({"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"})
    ]
    refusals.append(host.daemon.request("POST", "/api/tasks/submit", [1], BEARER)[0])
    refusals.append(
        host.daemon.request(
            "POST", "/api/tasks/submit", {"model_id": "nope", "task_type": "oneoff", "task_preset": "x"}, BEARER
        )[0]
    )
    refusals.append(
        host.daemon.request(
            "POST",
            "/api/tasks/submit",
            {"model_id": MODEL_ID, "task_type": "oneoff", "task_preset": "forbidden"},
            BEARER,
        )[0]
    )
    assert refusals == [401, 401, 401, 400, 404, 403]

    after = scrape(host)
    assert after.value("gpud_tasks_finished_total", type="oneoff", status="completed") == 3
    assert after.value("gpud_tasks_finished_total", type="oneoff", status="failed") == 1
    assert after.value("gpud_tasks_finished_total", type="session", status="completed") == 2
    assert after.value("gpud_task_duration_seconds_count", type="oneoff", status="completed") == 3
    assert after.value("gpud_task_queue_wait_seconds_count", type="oneoff") == 4
    assert after.value("gpud_task_queue_wait_seconds_count", type="session") == 2
    assert after.value("gpud_task_first_output_seconds_count", type="oneoff") == 4  # the crash printed first
    assert after.value("gpud_task_first_output_seconds_count", type="session") == 2
    for status, count in {"401": 3, "400": 1, "404": 1, "403": 1, "429": 0, "503": 0}.items():
        assert after.value("gpud_task_submissions_refused_total", status=status) == count, status
    assert after.value("gpud_worker_crashes_total", type="oneoff") == 1
    assert after.value("gpud_worker_crashes_total", type="session") == 0
    # The one-offs' leases have ended (counted); the session still holds GPU 1 (counted when it ends).
    assert (after.value("gpud_gpu_seconds_total", model=MODEL_ID, tier="low") or 0) > 0
    assert after.value("gpud_gpu_seconds_total", model=MODEL_ID, tier="high") == 0
    assert after.value("gpud_session_start_seconds_count", model=MODEL_ID) == 1
    assert after.value("gpud_worker_ready_seconds_count", model=MODEL_ID) == 1
    assert {state: after.value("gpud_sessions", state=state) for state in SESSION_STATES} == {
        state: 1 if state == "ready" else 0 for state in SESSION_STATES
    }
    assert after.value("gpud_tasks_active", status="running") == 0
    assert after.value("gpud_tasks_retained", status="completed") == 5
    assert after.value("gpud_tasks_retained", status="failed") == 1
    assert after["gpud_sse_clients"] == 0 and after["gpud_tasks_client_gone_cancelled_total"] == 0
    assert after["gpud_model_cache_bytes"] == len(TOKENS) + 1  # the hand-placed model: tokens.txt
    assert after["gpud_model_cache_limit_bytes"] == 1024**3
    assert after["gpud_engine_up"] == 1 and after["gpud_engine_errors_total"] == 0
    assert after.value("gpud_image_pulls_total", result="ok") == 0  # the process runtime pulls nothing
    assert "_created" not in after.text

    admin = scrape(host, admin=True)  # the admin socket serves /metrics too (no key: the socket is the auth)
    assert admin.value("gpud_tasks_finished_total", type="oneoff", status="completed") == 3


def test_a_crashed_session_worker_and_a_killed_session_are_counted(host: GpudHost) -> None:
    before = scrape(host)
    sessions = host.daemon.request("GET", "/api/sessions", headers=BEARER)[1]["sessions"]
    live = [session for session in sessions if session["state"] == "ready"]
    assert live, "the first test's session"
    for session in live:
        assert host.daemon.request("DELETE", f"/api/sessions/{session['session_id']}", headers=BEARER)[0] == 200
    crashed = finish(run(host, task_preset="stream", task_difficulty="high", metadata={"crash": True, "max_tokens": 4}))
    assert crashed["status"] == "failed"
    after = scrape(host)
    assert after.value("gpud_worker_crashes_total", type="session") == 1
    assert after.value("gpud_sessions", state="failed") == 1
    assert after.value("gpud_sessions", state="stopped") == len(live)
    assert after.value("gpud_sessions", state="ready") == 0
    # The killed session's lease time on the high GPU is counted now that it ended.
    assert (after.value("gpud_gpu_seconds_total", model=MODEL_ID, tier="high") or 0) > (
        before.value("gpud_gpu_seconds_total", model=MODEL_ID, tier="high") or 0
    )


def test_a_client_that_leaves_is_counted_while_connected_and_its_task_as_client_gone(host: GpudHost) -> None:
    body = json.dumps({"model_id": MODEL_ID, "task_type": "oneoff", "task_preset": "oneoff", "metadata": {"sleep": 60}})
    conn = http.client.HTTPConnection("127.0.0.1", host.daemon.port, timeout=30)
    conn.request("POST", "/api/tasks/submit", body=body, headers={**BEARER, "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # the first event has started to arrive
    wait_for(lambda: scrape(host)["gpud_sse_clients"] == 1, "the open stream to count as one SSE client")
    response.close()
    conn.close()
    wait_for(
        lambda: scrape(host)["gpud_tasks_client_gone_cancelled_total"] == 1,
        "the task to be cancelled once its client has been gone for the grace period",
        timeout=30,
    )
    after = scrape(host)
    assert after["gpud_sse_clients"] == 0
    wait_for(lambda: scrape(host).value("gpud_tasks_finished_total", type="oneoff", status="cancelled") == 1, "its end")


def test_a_worker_that_will_not_stop_a_task_is_restarted_and_counted(host: GpudHost) -> None:
    ended: list[list[SSEEvent]] = []
    stuck = {"ignore_cancel": True, "delay": 0.5, "max_tokens": 20}  # sleeps 10 s through any cancel
    submit = threading.Thread(
        target=lambda: ended.append(run(host, task_preset="stream", task_difficulty="high", metadata=stuck))
    )
    submit.start()

    def running() -> str | None:
        tasks = host.daemon.request("GET", "/api/tasks", headers=BEARER)[1]["tasks"]
        return next((t["task_id"] for t in tasks if t["status"] == "running" and t["task_type"] == "session"), None)

    task_id = wait_for(running, "the stuck task to run", timeout=30)
    assert host.daemon.request("DELETE", f"/api/tasks/{task_id}", headers=BEARER)[0] == 200
    submit.join(30)
    assert ended and finish(ended[0])["status"] == "cancelled"
    wait_for(lambda: scrape(host)["gpud_session_restarts_total"] == 1, "the restart to be counted", timeout=30)


def test_promtool_check_metrics_on_a_live_scrape_prints_nothing(host: GpudHost) -> None:
    promtool = require_tool("promtool")
    text = scrape(host).text
    assert "gpud_task_queue_wait_seconds_bucket" in text  # a scrape with data in its histograms
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stdout + done.stderr


async def test_model_fetches_failures_and_evictions_are_counted(svc: FileService, tmp_path: Path) -> None:
    env = {"AUTO_FETCH_MODELS": "true", "FILE_SERVICE_URL": svc.url, "FILE_SERVICE_INTERNAL_KEY": svc.key or ""}
    async for stack in stack_fixture("process", {**env, "GPUD_MODEL_CACHE_MAX_BYTES": "6m"}):
        tree = tmp_path / "tree"
        shutil.copytree(stack.base / "models" / stack.model_id, tree)
        shutil.rmtree(stack.base / "models" / stack.model_id)
        archive = svc.add_tree(stack.model_id, tree, tmp_path / "model.tar")
        svc.set(stack.model_id, status=500)
        assert (await stack.run(stack.body("oneoff")))[-1].data["error"]["code"] == "model_fetch_failed"
        svc.set(stack.model_id, status=None)
        assert (await stack.run(stack.body("oneoff")))[-1].data["status"] == "completed"
        fetched = await stack_scrape(stack)
        assert fetched["gpud_model_fetch_failures_total"] == 1
        assert fetched["gpud_model_fetch_duration_seconds_count"] == 1
        assert fetched["gpud_model_fetch_bytes_total"] == archive.stat().st_size
        assert fetched["gpud_model_cache_evictions_total"] == 0
        # Two 4 MiB models do not fit under the 6 MiB limit with it: fetching them evicts the least recently used.
        for name in ("big-a", "big-b"):
            svc.add_zeros(name, 4 * 1024 * 1024)
            await stack.services.models.prefetch(name)
        evicted = await stack_scrape(stack)
        assert evicted["gpud_model_cache_evictions_total"] == 2  # the task's model, then big-a
        assert evicted["gpud_model_fetch_duration_seconds_count"] == 3
        assert (
            evicted["gpud_model_cache_bytes"] == 4 * 1024 * 1024
            and evicted["gpud_model_cache_limit_bytes"] == 6 * 1024**2
        )


async def test_a_failed_image_pull_and_the_engine_are_counted_on_podman() -> None:
    async for stack in stack_fixture("podman"):
        assert (await stack.run(stack.body("oneoff")))[-1].data["status"] == "completed"
        events = await stack.run(stack.body("oneoff", preset="missing"))  # allowed, never built: the pull fails
        assert events[-1].data["status"] == "failed"
        counted = await stack_scrape(stack)
        assert counted.value("gpud_image_pulls_total", result="failed") == 1
        assert counted.value("gpud_image_pulls_total", result="ok") == 0  # the worker image was there
        assert counted["gpud_engine_up"] == 1 and counted["gpud_engine_errors_total"] == 0


async def stack_scrape(stack: Stack) -> Scrape:
    """/metrics of an in-process stack, with its key as a bearer token."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with stack.session.get(f"{stack.url}/metrics", headers=headers) as response:
        assert response.status == 200
        return Scrape(await response.text())


def fresh_python(scrape: Scrape) -> str:
    """The python label gpud_build_info carries (the daemon's interpreter)."""
    labels = next(dict(key[1]) for key in scrape.samples if key[0] == "gpud_build_info")
    return labels["python"]


def session_of(host: GpudHost, finished: dict[str, Any]) -> str:
    """The session a finished task ran on."""
    status, task = host.daemon.request("GET", f"/api/tasks/{finished['task_id']}", headers=BEARER)
    assert status == 200, task
    return str(task["session_id"])
