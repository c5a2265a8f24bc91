"""Per-task accounting from a real gpud over real HTTP: where each task's time went and on which GPU, in its
`task_finish` event and on GET /api/tasks/{id}, the same in both, and the same again after gpud restarts (the
records keep the ending). A one-off starts a container; a session's first task waits for the worker's start and
model load; a task on the warm session fetches nothing and starts nothing (null), and `gpuctl tasks show` says
so."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.daemonproc import DaemonProcess
from tests.integration.gpuctl_env import MODEL_ID, GpudHost, run_gpuctl, start_host
from tests.integration.stack import parse_sse
from tests.waiting import wait_for

KEY = {"X-API-Key": "test-key"}
PHASES = {"queue_wait_seconds", "model_fetch_seconds", "worker_start_seconds", "first_output_seconds", "run_seconds"}
# Timings are rounded to milliseconds; sums of rounded parts may differ from the rounded whole by this much.
ROUNDING = 0.0025


@pytest.fixture(scope="module")
def host() -> Iterator[GpudHost]:
    started = start_host()
    yield started
    started.close()


def finished(daemon: DaemonProcess, **body: Any) -> dict[str, Any]:
    """Submit, read the stream to its end, and return the task_finish data."""
    status, text = daemon.request("POST", "/api/tasks/submit", {"model_id": MODEL_ID, **body}, KEY)
    assert status == 200, text
    events = parse_sse(text)
    assert events[-1].event == "task_finish"
    return events[-1].data


def shown(daemon: DaemonProcess, task_id: str) -> dict[str, Any]:
    """GET /api/tasks/{id}."""
    status, task = daemon.request("GET", f"/api/tasks/{task_id}", headers=KEY)
    assert status == 200, task
    assert isinstance(task, dict)
    return task


def test_a_oneoff_reports_every_phase_and_its_gpu(host: GpudHost) -> None:
    end = finished(host.daemon, task_type="oneoff", task_preset="oneoff", metadata={"prompt": "a b c", "delay": 0.2})
    assert end["status"] == "completed" and end["gpu_id"] == 0
    timings = end["timings"]
    assert set(timings) == PHASES and all(isinstance(value, float | int) for value in timings.values()), timings
    # Submission -> running holds the model wait and the container's start; the first line comes after that.
    assert timings["queue_wait_seconds"] + ROUNDING >= timings["model_fetch_seconds"] + timings["worker_start_seconds"]
    assert timings["worker_start_seconds"] > 0
    assert timings["queue_wait_seconds"] <= timings["first_output_seconds"] <= end["elapsed_seconds"]
    assert timings["run_seconds"] >= 0.4  # three lines 0.2 s apart
    assert abs(timings["queue_wait_seconds"] + timings["run_seconds"] - end["elapsed_seconds"]) <= ROUNDING
    task = shown(host.daemon, end["task_id"])
    assert task["timings"] == timings and task["gpu_id"] == end["gpu_id"]


def test_a_warm_session_task_starts_no_worker(host: GpudHost) -> None:
    first = finished(host.daemon, task_type="session", task_preset="stream", task_difficulty="high")
    session_id = shown(host.daemon, first["task_id"])["session_id"]
    warm = finished(host.daemon, task_type="session", task_preset="stream", session_id=session_id)
    assert first["status"] == warm["status"] == "completed" and first["gpu_id"] == warm["gpu_id"] == 1
    cold = first["timings"]
    assert cold["model_fetch_seconds"] is not None and cold["worker_start_seconds"] > 0  # the worker's start and load
    assert cold["queue_wait_seconds"] + ROUNDING >= cold["model_fetch_seconds"] + cold["worker_start_seconds"]
    assert warm["timings"]["model_fetch_seconds"] is None and warm["timings"]["worker_start_seconds"] is None
    assert warm["timings"]["queue_wait_seconds"] < cold["queue_wait_seconds"]
    assert warm["timings"]["first_output_seconds"] is not None and warm["timings"]["run_seconds"] > 0
    for end in (first, warm):
        assert shown(host.daemon, end["task_id"])["timings"] == end["timings"]
    table = run_gpuctl(host.socket, ["tasks", "show", warm["task_id"]]).stdout
    assert "timings:   queue " in table and ", fetch -, start -, first output " in table, table
    assert host.daemon.request("DELETE", f"/api/sessions/{session_id}", headers=KEY)[0] == 200


def test_a_task_cancelled_while_queued_never_ran(host: GpudHost) -> None:
    ends: dict[str, dict[str, Any]] = {}

    def submit(name: str, **body: Any) -> threading.Thread:
        thread = threading.Thread(target=lambda: ends.update({name: finished(host.daemon, **body)}))
        thread.start()
        return thread

    def task_in(status: str, session_id: str | None = None) -> dict[str, Any] | None:
        tasks = host.daemon.request("GET", "/api/tasks", headers=KEY)[1]["tasks"]
        found = (t for t in tasks if t["status"] == status and t["task_type"] == "session")
        return next((t for t in found if session_id in (None, t["session_id"])), None)

    slow = {"task_type": "session", "task_preset": "stream", "task_difficulty": "high"}
    busy = submit("busy", **slow, metadata={"max_tokens": 10, "delay": 0.3})
    running = wait_for(lambda: task_in("running"), "the first task to run")
    waiting = submit("queued", task_type="session", task_preset="stream", session_id=running["session_id"])
    queued = wait_for(lambda: task_in("queued", running["session_id"]), "the second task to wait in the queue")
    assert host.daemon.request("DELETE", f"/api/tasks/{queued['task_id']}", headers=KEY)[0] == 200
    for thread in (busy, waiting):
        thread.join(30)
    assert ends["queued"]["status"] == "cancelled" and ends["busy"]["status"] == "completed"
    assert ends["queued"]["timings"] == dict.fromkeys(PHASES)  # it never ran: every phase null
    assert ends["queued"]["gpu_id"] == 1  # the session's GPU, where it waited
    assert host.daemon.request("DELETE", f"/api/sessions/{running['session_id']}", headers=KEY)[0] == 200


def test_timings_survive_a_restart_in_the_records(host: GpudHost) -> None:
    end = finished(host.daemon, task_type="oneoff", task_preset="oneoff", metadata={"prompt": "kept"})
    host.daemon.kill()  # a clean stop: the records are written
    env = {
        k: v for k, v in host.daemon.env.items() if k not in {"GPUD_HTTP_LISTEN", "GPUD_ADMIN_SOCKET", "NOTIFY_SOCKET"}
    }
    again = DaemonProcess(host.base, env).start()
    try:
        task = shown(again, end["task_id"])
        assert task["status"] == "completed" and task["timings"] == end["timings"] and task["gpu_id"] == 0
    finally:
        again.kill()
