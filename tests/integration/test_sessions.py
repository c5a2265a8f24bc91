"""Sessions on the process runtime and real Podman and Docker: reuse, FIFO, timers, kill, crash, cancel, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.stack import Stack, parse_sse, runtimes, stack_fixture
from tests.waiting import wait_until


@pytest.fixture(params=runtimes())
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async for opened in stack_fixture(request.param):
        yield opened


@pytest.fixture(params=runtimes())
async def short_stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """Sessions with short timers."""
    env = {"SESSION_IDLE_TIMEOUT_SECONDS": "1.5", "SESSION_MAX_LIFETIME_SECONDS": "30"}
    async for opened in stack_fixture(request.param, env):
        yield opened


def finish_of(events: list) -> dict[str, Any]:
    assert events[-1].event == "task_finish", [e.event for e in events]
    return events[-1].data


async def open_session(stack: Stack, **metadata: Any) -> tuple[str, list]:
    events = await stack.run(stack.body("session", metadata={"max_tokens": 3, "delay": 0.01, **metadata}))
    assert finish_of(events)["status"] == "completed", events[-1].data
    connection = next(e for e in events if e.event == "connection")
    assert connection.data["status"] == "session_ready"
    return connection.data["session_id"], events


async def test_second_request_reuses_the_container_and_the_loaded_model(stack: Stack) -> None:
    session_id, first = await open_session(stack)
    statuses = [e.data["status"] for e in first if e.event == "worker"]
    assert statuses[:3] == ["created", "loading", "working"] and statuses[-1] == "waiting"
    _, task1 = await stack.get(f"/api/tasks/{first[0].data['task_id']}")
    second = await stack.run(stack.body("session", session_id=session_id, metadata={"max_tokens": 4, "delay": 0.01}))
    assert finish_of(second)["status"] == "completed"
    _, task2 = await stack.get(f"/api/tasks/{second[0].data['task_id']}")
    assert task1["container_id"] == task2["container_id"]
    assert task1["result"]["load_count"] == 1 and task2["result"]["load_count"] == 1, "the model loaded once"
    assert len(await stack.containers()) == 1
    _, session = await stack.get(f"/api/sessions/{session_id}")
    assert session["state"] == "ready" and session["tasks_run"] == 2 and session["worker"]["load_count"] == 1
    assert session["model_id"] == stack.model_id and session["gpu_id"] == 0


async def test_fifo_order_of_five_queued_and_the_sixth_gets_429(stack: Stack) -> None:
    session_id, _ = await open_session(stack)
    blocker = await stack.submit(
        stack.body("session", session_id=session_id, metadata={"max_tokens": 20, "delay": 0.1})
    )
    await wait_until(lambda: _state(stack, session_id, "working"), "the session to be working on the task")
    queued = [
        await stack.submit(stack.body("session", session_id=session_id, metadata={"prompt": f"q{i}", "max_tokens": 1}))
        for i in range(5)
    ]
    async with await stack.submit(stack.body("session", session_id=session_id)) as sixth:
        assert sixth.status == 429 and sixth.headers["Retry-After"]
        assert (await sixth.json())["error"]["code"] == "session_queue_full"
    streams = [parse_sse(await r.text()) for r in [blocker, *queued]]
    finished = [(s[-1].data["task_id"], s[-1].data["status"]) for s in streams]
    assert all(status == "completed" for _, status in finished)
    started = []
    for events in streams[1:]:
        _, task = await stack.get(f"/api/tasks/{events[0].data['task_id']}")
        started.append(task["started_at"])
        positions = [e.data["queue_position"] for e in events if e.event == "worker" and e.data["status"] == "queued"]
        assert positions == sorted(positions, reverse=True), "queue positions only move forward"
    assert started == sorted(started), "queued tasks ran in submission order"


async def _state(stack: Stack, session_id: str, state: str) -> bool:
    _, session = await stack.get(f"/api/sessions/{session_id}")
    return session["state"] == state


async def test_idle_timeout_ends_the_session_and_frees_everything(short_stack: Stack) -> None:
    session_id, _ = await open_session(short_stack)
    await wait_until(lambda: _state(short_stack, session_id, "stopped"), "the session to stop")
    _, session = await short_stack.get(f"/api/sessions/{session_id}")
    assert session["end_reason"] == "idle_timeout"
    assert await short_stack.containers() == [] and short_stack.services.scheduler.leases() == []
    async with await short_stack.submit(short_stack.body("session", session_id=session_id)) as late:
        assert late.status == 410 and (await late.json())["error"]["code"] == "session_ended"


async def test_keepalive_holds_off_the_idle_timeout(short_stack: Stack) -> None:
    session_id, _ = await open_session(short_stack)
    for _ in range(8):  # 4 s of keepalives every 0.5 s: well past the 1.5 s idle timeout
        status, body = await short_stack.call("POST", f"/api/sessions/{session_id}/keepalive")
        assert status == 200 and body["state"] == "ready"
        await asyncio.sleep(0.5)  # the time passing between keepalives is what this test is about
    await wait_until(lambda: _state(short_stack, session_id, "stopped"), "the session to stop")


@pytest.fixture(params=runtimes())
async def lifetime_stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    env = {"SESSION_MAX_LIFETIME_SECONDS": "3", "SESSION_IDLE_TIMEOUT_SECONDS": "60"}
    async for opened in stack_fixture(request.param, env):
        yield opened


async def test_max_lifetime_ends_the_session_after_the_running_task(lifetime_stack: Stack) -> None:
    stack = lifetime_stack
    session_id, _ = await open_session(stack)
    # This task outlives the session's lifetime: it still completes, then the session ends.
    events = await stack.run(stack.body("session", session_id=session_id, metadata={"max_tokens": 30, "delay": 0.1}))
    assert finish_of(events)["status"] == "completed"
    await wait_until(lambda: _state(stack, session_id, "stopped"), "the session to stop")
    _, session = await stack.get(f"/api/sessions/{session_id}")
    assert session["end_reason"] == "max_lifetime"
    async with await stack.submit(stack.body("session", session_id=session_id)) as late:
        assert late.status == 410
    assert await stack.containers() == []


async def test_kill_cancels_running_and_queued_tasks_and_removes_the_worker(stack: Stack) -> None:
    session_id, _ = await open_session(stack)
    running = await stack.submit(
        stack.body("session", session_id=session_id, metadata={"max_tokens": 100, "delay": 0.1})
    )
    await wait_until(lambda: _state(stack, session_id, "working"), "the session to be working on the task")
    queued = await stack.submit(stack.body("session", session_id=session_id))
    status, body = await stack.call("DELETE", f"/api/sessions/{session_id}")
    assert status == 200 and body["state"] == "stopped" and body["end_reason"] == "killed"
    for response in (running, queued):
        finish = finish_of(parse_sse(await response.text()))
        assert finish["status"] == "cancelled" and finish["error"]["code"] == "session_killed"
    assert await stack.containers() == [] and stack.services.scheduler.leases() == []


async def test_worker_crash_mid_task_fails_it_and_the_queue_and_frees_the_gpu(stack: Stack) -> None:
    session_id, _ = await open_session(stack)
    crashing = await stack.submit(
        stack.body("session", session_id=session_id, metadata={"crash": True, "max_tokens": 20, "delay": 0.1})
    )
    await wait_until(lambda: _state(stack, session_id, "working"), "the session to be working on the task")
    queued = await stack.submit(stack.body("session", session_id=session_id))
    crashed = finish_of(parse_sse(await crashing.text()))
    assert crashed["status"] == "failed" and crashed["exit_code"] == 3
    assert crashed["error"]["code"] == "worker_crashed" and "last log lines" in crashed["error"]["message"]
    assert finish_of(parse_sse(await queued.text()))["error"]["code"] == "session_failed"
    _, session = await stack.get(f"/api/sessions/{session_id}")
    assert session["state"] == "failed" and session["end_reason"] == "worker_crashed"
    assert await stack.containers() == [] and stack.services.scheduler.leases() == []


async def test_cancel_running_task_keeps_the_model_loaded_and_cancel_queued(stack: Stack) -> None:
    session_id, _ = await open_session(stack)
    running = await stack.submit(
        stack.body("session", session_id=session_id, metadata={"max_tokens": 200, "delay": 0.05})
    )
    await wait_until(lambda: _state(stack, session_id, "working"), "the session to be working on the task")
    queued = await stack.submit(stack.body("session", session_id=session_id))
    queued_id = parse_sse((await queued.content.readuntil(b"\n\n")).decode())[0].data["task_id"]
    status, body = await stack.call("DELETE", f"/api/tasks/{queued_id}")
    assert status == 200
    assert finish_of(parse_sse(await queued.text()))["status"] == "cancelled"
    running_id = parse_sse((await running.content.readuntil(b"\n\n")).decode())[0].data["task_id"]
    await stack.call("DELETE", f"/api/tasks/{running_id}")
    assert finish_of(parse_sse(await running.text()))["status"] == "cancelled"
    after = await stack.run(stack.body("session", session_id=session_id))
    _, task = await stack.get(f"/api/tasks/{after[0].data['task_id']}")
    assert task["status"] == "completed" and task["result"]["load_count"] == 1
    _, session = await stack.get(f"/api/sessions/{session_id}")
    assert session["restarts"] == 0


async def test_worker_ignoring_cancel_is_restarted_and_the_client_told(stack: Stack) -> None:
    session_id, _ = await open_session(stack)
    stuck = await stack.submit(
        stack.body("session", session_id=session_id, metadata={"ignore_cancel": True, "max_tokens": 300, "delay": 0.1})
    )
    await wait_until(lambda: _state(stack, session_id, "working"), "the session to be working on the task")
    stuck_id = parse_sse((await stuck.content.readuntil(b"\n\n")).decode())[0].data["task_id"]
    await stack.call("DELETE", f"/api/tasks/{stuck_id}")
    finish = finish_of(parse_sse(await stuck.text()))
    assert finish["status"] == "cancelled" and "session was restarted" in finish["error"]["message"]
    await wait_until(lambda: _state(stack, session_id, "ready"), "the session to be ready again")
    after = await stack.run(stack.body("session", session_id=session_id))
    assert finish_of(after)["status"] == "completed"
    _, session = await stack.get(f"/api/sessions/{session_id}")
    assert session["restarts"] == 1 and len(await stack.containers()) == 1


async def test_shutdown_with_live_sessions_leaves_no_containers(stack: Stack) -> None:
    first, _ = await open_session(stack)
    busy = await stack.submit(stack.body("session", session_id=first, metadata={"max_tokens": 200, "delay": 0.1}))
    high = await stack.run(stack.body("session", task_difficulty="high", metadata={"max_tokens": 1}))
    assert finish_of(high)["status"] == "completed"
    assert len(await stack.containers()) == 2
    await stack.services.tasks.shutdown()
    finish = finish_of(parse_sse(await busy.text()))
    assert finish["status"] == "cancelled" and finish["error"]["code"] == "session_shutdown"
    assert await stack.containers() == []
    assert stack.services.scheduler.leases() == []
