"""One task on a session's worker: its events streamed into the task, its timeout and cancel, its outcome."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import re
from typing import Any

from gpud.clock import Clock
from gpud.work.event import EventType
from gpud.work.launch import TAIL_LINE_CHARS, timeout_error
from gpud.work.sessions.record import Session
from gpud.work.sessions.wakeup import Wakeup
from gpud.work.sessions.worker import SessionWorker
from gpud.work.task import Task, TaskError, TaskStatus, cancel_error
from gpud.worker.messages import TaskStream, WorkerError, WorkerEvent

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

    start() sends the task (from whichever step runs first: the submitting request when the worker waits idle, else
    the session's own task); the worker's events then arrive in _on_event, called by the channel as it reads them,
    and run() supervises. `wake` is set by whoever changes what the run should do (a cancel, a kill)."""

    def __init__(self, session: Session, worker: SessionWorker, task: Task, wake: Wakeup, clock: Clock) -> None:
        self.task = task
        self._session = session
        self._worker = worker
        self._wake = wake
        self._clock = clock
        self._done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._stream: TaskStream | None = None
        self._error: dict[str, Any] | None = None
        self._started = False
        self._send_handle: asyncio.Handle | None = None
        self._deadline = 0.0

    def start(self, *, after_this_step: bool = False) -> None:
        """Say `working` and send the task to the worker: now, or `after_this_step` (the submitting request's step
        writes `connection` and `working` to its client first, in one write, then the loop's next callback sends
        the task: a client waiting for its first event is not kept waiting for the worker's send)."""
        task, session = self.task, self._session
        self._started = True
        self._deadline = self._clock.monotonic() + task.request.timeout_seconds
        task.emit(EventType.WORKER, status="working", container_id=session.container_id, session_id=session.id)
        if after_this_step:
            self._send_handle = asyncio.get_running_loop().call_soon(self._send)
        else:
            self._send()

    def _send(self) -> None:
        self._send_handle = None
        self._stream = self._worker.channel.start_task(self.task.id, dict(self.task.request.metadata), self._on_event)

    async def run(self) -> RunOutcome:
        """Supervise the task (started now unless start() ran); returns what the session must do next."""
        if not self._started:
            self.start()
        try:
            return await self._supervise()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop taking the worker's events for this task (the run is over, or never ran)."""
        if self._send_handle is not None:  # never sent: the session ended first
            self._send_handle.cancel()
            self._send_handle = None
        if self._stream is not None:
            self._worker.channel.abandon(self._stream)
        if not self._done.done():
            self._done.cancel()
        elif not self._done.cancelled():
            self._done.exception()  # retrieved: an error nobody waits for is not a warning

    async def _supervise(self) -> RunOutcome:
        task, session = self.task, self._session
        deadline = self._deadline
        cancel_sent = False
        while not self._done.done():
            self._wake.clear()
            # Looked at before waiting too: a cancel may have come while the task waited for this step.
            cancel_pending = bool(task.cancel_reason) and not cancel_sent
            if not cancel_pending and session.stop_reason is None:
                waiter = self._wake.future()
                await self._clock.wait({self._done, waiter}, deadline)
                waiter.cancel()
                if self._done.done():
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
        return self._finish_from(self._done)

    def _on_event(self, item: WorkerEvent | WorkerError) -> None:
        """One of the worker's events for the task, into its log; `done` finishes the task at once (waiting for the
        supervisor's turn delayed the client's task_finish by loop turns). A WorkerError ends the run."""
        if self._done.done():
            return
        try:
            if isinstance(item, WorkerError):
                raise item
            if item.type == "done":
                done = {**item.data, "error": self._error}
                self._conclude(done)
                self._done.set_result(done)
            else:
                self._take(item)
        except Exception as exc:  # a WorkerError is a crash; anything else, a bug the session reports
            self._done.set_exception(exc)

    def _take(self, event: WorkerEvent) -> None:
        """Worker data is untrusted: strings arrive cleaned by the protocol decoder, and here each message keeps only
        the fields it should have, of the types they should be (the event log then bounds the sizes)."""
        task, worker, data = self.task, self._worker, event.data
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
            self._error = data

    def _finish_from(self, done: asyncio.Future[dict[str, Any]]) -> RunOutcome:
        if done.cancelled() or isinstance(done.exception(), WorkerError):
            return RunOutcome.CRASHED
        self._conclude(done.result())  # result() raises what _on_event caught, for the session to handle
        return RunOutcome.OK

    def _conclude(self, done: dict[str, Any]) -> None:
        """Finish the task as the worker's `done` says (once)."""
        task, session = self.task, self._session
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
