"""Whatever goes wrong inside a session, its running task finishes, its stream ends and its GPU comes back
(security review, finding 4: the task once stayed `running` forever). Faults are injected into a real stack
(process runtime) at the points where an exception once escaped: the task's run, emitting an event, finishing,
and the teardown itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpud.work.events import TaskEventLog
from gpud.work.sessions.taskrun import TaskRun
from gpud.work.task import Task
from tests.integration.stack import Stack, stack_fixture
from tests.waiting import wait_until


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async for opened in stack_fixture("process"):
        yield opened


async def run_to_end(stack: Stack, **metadata: Any) -> tuple[dict[str, Any], float]:
    """A session task's final event and how long the stream took."""
    started = time.monotonic()
    events = await asyncio.wait_for(stack.run(stack.body("session", metadata=metadata, timeout_seconds=120)), 60)
    assert events[-1].event == "task_finish", [e.event for e in events]
    return events[-1].data, time.monotonic() - started


async def nothing_left(stack: Stack) -> None:
    await wait_until(lambda: not stack.services.scheduler.leases(), "the GPU to be released", timeout=15)
    _, listing = await stack.get("/api/tasks")
    assert all(t["status"] not in ("queued", "running") for t in listing["tasks"]), listing


async def test_an_error_in_the_run_fails_the_task_at_once(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: TaskRun) -> Any:
        raise RuntimeError("injected: the run broke")

    monkeypatch.setattr(TaskRun, "run", broken)
    finish, seconds = await run_to_end(stack)
    assert finish["status"] == "failed" and finish["error"]["code"] == "internal_error" and seconds < 30
    await nothing_left(stack)


async def test_an_error_while_emitting_fails_the_task(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Task.emit

    def emit(self: Task, type: Any, **data: Any) -> None:
        if data.get("status") == "waiting":  # the event just before the task's own finish
            raise ValueError("injected: emitting failed")
        original(self, type, **data)

    monkeypatch.setattr(Task, "emit", emit)
    finish, _ = await run_to_end(stack, max_tokens=2, delay=0)
    assert finish["status"] == "failed" and finish["error"]["code"] == "internal_error"
    await nothing_left(stack)


async def test_an_error_inside_finish_still_ends_the_stream(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    original = TaskEventLog.append_text
    calls = []

    def append_text(self: TaskEventLog) -> Any:
        calls.append(self.task_id)
        if len(calls) == 1:
            raise RuntimeError("injected: the text event failed")
        return original(self)

    monkeypatch.setattr(TaskEventLog, "append_text", append_text)
    finish, _ = await run_to_end(stack, max_tokens=2, delay=0)
    assert finish["status"] == "completed", "the finish event still went out"
    await nothing_left(stack)


async def test_an_error_in_the_teardown_still_finishes_the_tasks(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: TaskRun) -> Any:
        raise RuntimeError("injected: the run broke")

    release = stack.services.models.release

    def failing_release(model_id: str, holder: str) -> None:
        release(model_id, holder)
        raise OSError("injected: releasing the model failed")

    monkeypatch.setattr(TaskRun, "run", broken)
    monkeypatch.setattr(stack.services.models, "release", failing_release)
    finish, seconds = await run_to_end(stack)
    assert finish["status"] == "failed" and seconds < 30
    await nothing_left(stack)  # the GPU was released after the step that failed
