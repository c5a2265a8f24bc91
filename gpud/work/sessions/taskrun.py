"""One task on a session's worker: its events streamed into the task, its timeout and cancel, its outcome."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from typing import Any

from gpud.clock import Clock
from gpud.work.events import EventType
from gpud.work.launch import timeout_error
from gpud.work.sessions.record import Session
from gpud.work.sessions.worker import SessionWorker
from gpud.work.task import Task, TaskError, TaskStatus, cancel_error
from gpud.worker.channel import WorkerError

logger = logging.getLogger(__name__)

# How long a worker has to stop a cancelled (or timed-out) task before the session is restarted.
CANCEL_GRACE_SECONDS = 5.0

STOP_REASONS = {
    "killed": "the session was killed",
    "idle_timeout": "the session was idle past SESSION_IDLE_TIMEOUT_SECONDS",
    "max_lifetime": "the session reached SESSION_MAX_LIFETIME_SECONDS",
    "shutdown": "gpud is shutting down",
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

    def __init__(self, session: Session, worker: SessionWorker, task: Task, wake: asyncio.Event, clock: Clock) -> None:
        self._session = session
        self._worker = worker
        self._task = task
        self._wake = wake
        self._clock = clock

    async def run(self) -> RunOutcome:
        """Stream the task's events and supervise it; returns what the session must do next."""
        consumer = asyncio.create_task(self._consume())
        try:
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
            waiter = asyncio.ensure_future(self._wake.wait())
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
        """Stream the worker's events for the task into its log; return the `done` message."""
        task, worker = self._task, self._worker
        error: dict[str, Any] | None = None
        async for event in worker.channel.run_task(task.id, dict(task.request.metadata)):
            data = event.data
            if event.type == "text_delta":
                task.emit(EventType.TEXT_DELTA, delta=str(data.get("delta", "")))
            elif event.type == "text":
                task.output = [str(data.get("text", ""))]
            elif event.type == "log":
                line = str(data.get("line", ""))
                worker.tail.append(line)  # quoted if the worker crashes, like its container output
                task.emit(EventType.LOGS, stream=str(data.get("stream", "worker")), line=line)
            elif event.type == "progress":
                task.emit(EventType.PROGRESS, **{k: v for k, v in data.items() if k != "task_id"})
            elif event.type == "result":
                task.result = {k: v for k, v in data.items() if k != "task_id"}
            elif event.type == "error":
                error = data
            elif event.type == "done":
                return {**data, "error": error}
        raise WorkerError("worker stream ended without done")

    def _finish_from(self, consumer: asyncio.Task[dict[str, Any]]) -> RunOutcome:
        task, session = self._task, self._session
        if consumer.cancelled() or isinstance(consumer.exception(), WorkerError):
            return RunOutcome.CRASHED
        done = consumer.result()  # raises what the consumer raised, for the session to handle
        # The worker is idle again, model loaded: the original design's WAITING.
        task.emit(EventType.WORKER, status="waiting", container_id=session.container_id, session_id=session.id)
        status = str(done.get("status", "completed"))
        error = done.get("error") or {}
        if task.cancel_reason and status == "cancelled":
            finish_cancelled(task, stuck=False)
        elif status == "completed":
            task.finish(TaskStatus.COMPLETED)
        elif status == "cancelled":
            task.finish(TaskStatus.CANCELLED, error=TaskError("cancelled", "the worker cancelled the task"))
        else:
            message = str(error.get("message") or "the worker reported a failure")
            task.finish(TaskStatus.FAILED, error=TaskError(str(error.get("code") or "task_failed"), message))
        return RunOutcome.OK


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
