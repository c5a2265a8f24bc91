"""One task on a session's worker: its events streamed into the task, its timeout and cancel, its outcome."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import re
from collections.abc import AsyncIterator
from typing import Any

from gpud.clock import Clock
from gpud.work.events import EventType
from gpud.work.launch import TAIL_LINE_CHARS, timeout_error
from gpud.work.sessions.record import Session
from gpud.work.sessions.wakeup import Wakeup
from gpud.work.sessions.worker import SessionWorker
from gpud.work.task import Task, TaskError, TaskStatus, cancel_error
from gpud.worker.channel import WorkerError, WorkerEvent

logger = logging.getLogger(__name__)

# Caps on what a worker's progress and error messages carry into a task (and gpud's log).
PROGRESS_MESSAGE_CHARS = 200
ERROR_CODE_CHARS = 64
ERROR_MESSAGE_CHARS = 4096
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TERMINAL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# How long a worker has to stop a cancelled (or timed-out) task before the session is restarted.
CANCEL_GRACE_SECONDS = 5.0

STOP_REASONS = {
    "killed": "the session was killed",
    "idle_timeout": "the session was idle past SESSION_IDLE_TIMEOUT_SECONDS",
    "max_lifetime": "the session reached SESSION_MAX_LIFETIME_SECONDS",
    "shutdown": "gpud is shutting down",
    "evicted": "the session was idle and its GPU was given to new work (GPUD_SESSION_EVICT_IDLE)",
}


class RunOutcome(enum.Enum):
    """What the session does after a task: carry on, restart a stuck worker, fail, or stop."""

    OK = "ok"
    RESTART = "restart"  # the worker did not stop a cancelled task in time
    CRASHED = "crashed"  # the worker's connection dropped mid-task
    STOP = "stop"  # the session was asked to end while the task ran


class TaskRun:
    """Runs `task` on `worker` until it ends, times out, is cancelled, or the session must stop.

    `wake` is set by whoever changes what the run should do (a cancel, a kill); the run then re-checks."""

    def __init__(self, session: Session, worker: SessionWorker, task: Task, wake: Wakeup, clock: Clock) -> None:
        self._session = session
        self._worker = worker
        self._task = task
        self._wake = wake
        self._clock = clock

    async def run(self) -> RunOutcome:
        """Stream the task's events and supervise it; returns what the session must do next."""
        consumer = asyncio.create_task(self._consume())
        session = self._session
        try:
            # After the consumer is created: its first step (sending the task to the worker) then runs before the
            # SSE writes this event wakes, so the worker starts as early as it can.
            self._task.emit(
                EventType.WORKER, status="working", container_id=session.container_id, session_id=session.id
            )
            return await self._supervise(consumer)
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consumer

    async def _supervise(self, consumer: asyncio.Task[dict[str, Any]]) -> RunOutcome:
        task, session = self._task, self._session
        deadline = self._clock.monotonic() + task.request.timeout_seconds
        cancel_sent = False
        while not consumer.done():
            self._wake.clear()
            waiter = self._wake.future()
            await self._clock.wait({consumer, waiter}, deadline)
            waiter.cancel()
            if consumer.done():
                break
            if session.stop_reason is not None:
                task.finish(TaskStatus.CANCELLED, error=stop_error(session.stop_reason))
                return RunOutcome.STOP
            overdue = self._clock.monotonic() >= deadline
            if (overdue or task.cancel_reason) and not cancel_sent:
                cancel_sent = True
                if overdue and task.cancel_reason is None:
                    task.cancel_reason = "timeout"
                with contextlib.suppress(WorkerError):
                    await self._worker.channel.cancel(task.id)
                deadline = self._clock.monotonic() + CANCEL_GRACE_SECONDS
            elif overdue:
                finish_cancelled(task, stuck=True)
                return RunOutcome.RESTART
        return self._finish_from(consumer)

    async def _consume(self) -> dict[str, Any]:
        """Stream the worker's events for the task into its log; return the `done` message.

        Worker data is untrusted: strings arrive cleaned by the protocol decoder, and here each message keeps only
        the fields it should have, of the types they should be (the event log then bounds the sizes)."""
        task, worker = self._task, self._worker
        # Closed here, when `done` returns from the loop: left to the garbage collector, the generator is closed by
        # asyncio's finalizer hook, a new task woken through the loop's self-pipe (a loop turn per task).
        async with contextlib.aclosing(worker.channel.run_task(task.id, dict(task.request.metadata))) as events:
            return await self._consume_events(events)

    async def _consume_events(self, events: AsyncIterator[WorkerEvent]) -> dict[str, Any]:
        task, worker = self._task, self._worker
        error: dict[str, Any] | None = None
        async for event in events:
            data = event.data
            if event.type == "text_delta":
                task.emit_delta(_text(data.get("delta")))
            elif event.type == "text":
                task.set_text(_text(data.get("text")))
            elif event.type == "log":
                line, stream = _text(data.get("line")), _name(data.get("stream"), "worker")
                worker.tail.append(line[:TAIL_LINE_CHARS])  # quoted if the worker crashes, like its container output
                worker.output.add(stream, line, task_id=task.id)  # for `gpuctl logs`, among its container output
                task.emit(EventType.LOGS, stream=stream, line=line)
            elif event.type == "progress":
                task.emit(EventType.PROGRESS, **progress_fields(data))
            elif event.type == "result":
                task.result = {k: v for k, v in data.items() if k != "task_id"}
            elif event.type == "error":
                error = data
            elif event.type == "done":
                done = {**data, "error": error}
                # Finished here, at once: waiting for the supervisor's turn (its wait wakes two loop turns later,
                # after the session's bookkeeping) delayed the client's task_finish.
                self._conclude(done)
                return done
        raise WorkerError("worker stream ended without done")

    def _finish_from(self, consumer: asyncio.Task[dict[str, Any]]) -> RunOutcome:
        if consumer.cancelled() or isinstance(consumer.exception(), WorkerError):
            return RunOutcome.CRASHED
        self._conclude(consumer.result())  # result() raises what the consumer raised, for the session to handle
        return RunOutcome.OK

    def _conclude(self, done: dict[str, Any]) -> None:
        """Finish the task as the worker's `done` says (once: the consumer does it, unless it was cut short)."""
        task, session = self._task, self._session
        if task.final:
            return
        # The worker is idle again, model loaded: the original design's WAITING.
        task.emit(EventType.WORKER, status="waiting", container_id=session.container_id, session_id=session.id)
        status = done.get("status", "completed")
        error = done.get("error") or {}
        if task.cancel_reason and status == "cancelled":
            finish_cancelled(task, stuck=False)
        elif status == "completed":
            task.finish(TaskStatus.COMPLETED)
        elif status == "cancelled":
            task.finish(TaskStatus.CANCELLED, error=TaskError("cancelled", "the worker cancelled the task"))
        else:
            task.finish(TaskStatus.FAILED, error=worker_error(error))


def finish_cancelled(task: Task, stuck: bool) -> None:
    """Finish a task whose cancel (or timeout) took effect; `stuck` when the worker had to be restarted for it."""
    suffix = f"; the worker did not stop it within {CANCEL_GRACE_SECONDS:g}s, so the session was restarted"
    suffix = suffix if stuck else ""
    if task.cancel_reason == "timeout":
        task.finish(TaskStatus.TIMEOUT, error=timeout_error(task, suffix))
        return
    error = cancel_error(task.cancel_reason or "cancelled")
    task.finish(TaskStatus.CANCELLED, error=TaskError(error.code, error.message + suffix))


def stop_error(reason: str) -> TaskError:
    """The error of a task ended because its session stopped for `reason`."""
    code = reason if reason.startswith("session") else f"session_{reason}"
    return TaskError(code, STOP_REASONS.get(reason, reason))


def _text(value: object) -> str:
    """A worker's text field: strings as they are, nothing for null, other JSON as its text."""
    if isinstance(value, str):
        return value
    return "" if value is None else str(value)


def _name(value: object, default: str) -> str:
    """A short name (a log stream): letters, digits and `._-`, at most 32 characters."""
    text = _UNSAFE_NAME.sub("_", value[:32]) if isinstance(value, str) else ""
    return text or default


def progress_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A progress message reduced to what a client may rely on: finite, non-negative `done` and `total` (or
    null), and an optional short `message`; anything else a worker sends is dropped."""
    fields: dict[str, Any] = {}
    for key in ("done", "total"):
        fields[key] = _count(data.get(key))
    message = data.get("message")
    if isinstance(message, str) and message:
        fields["message"] = _one_line(message)[:PROGRESS_MESSAGE_CHARS]
    return fields


def _count(value: object) -> float | int | None:
    """A finite, non-negative number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return value if math.isfinite(number) and number >= 0 else None


def worker_error(error: dict[str, Any]) -> TaskError:
    """The task error a worker's `error` message gives: a code of safe characters and a capped message."""
    code = error.get("code")
    code = _UNSAFE_NAME.sub("_", code[:ERROR_CODE_CHARS]) if isinstance(code, str) else ""
    # Newlines and tabs stay (a message may be a few lines); other control characters, which could drive a
    # terminal showing it, become spaces. gpud's log formatter escapes the newlines where it quotes the message.
    message = _TERMINAL_CONTROL.sub(" ", _text(error.get("message"))) or "the worker reported a failure"
    if len(message) > ERROR_MESSAGE_CHARS:
        message = message[:ERROR_MESSAGE_CHARS] + f"… [{len(message) - ERROR_MESSAGE_CHARS} more characters cut]"
    return TaskError(code or "task_failed", message)


def _one_line(text: str) -> str:
    return _CONTROL.sub(" ", text)
