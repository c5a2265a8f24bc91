"""Tasks: the record of one submission (status, times, output, events); gpud/work/registry.py keeps them."""

from __future__ import annotations

import enum
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gpud.jsonsafe import clean_text
from gpud.settings.presets import Preset
from gpud.work import tasklog
from gpud.work.events import Event, EventLimits, EventType, TaskEventLog
from gpud.work.request import TaskRequest
from gpud.work.timings import TaskTimings

logger = logging.getLogger(__name__)


class TaskStatus(enum.StrEnum):
    """Where a task is in its life; the last four are final."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


FINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELLED})


def new_id() -> str:
    """A random 128-bit id in hex: unguessable, so ids double as capabilities to read a task's stream."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class TaskError:
    """Why a task did not complete: a stable code and a message for people."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """As JSON."""
        return {"code": self.code, "message": self.message}


CancelHook = Callable[[str], Coroutine[Any, Any, None]]

_CANCEL_MESSAGES = {
    "client_gone": "every client disconnected and none came back within the grace period",
    "shutdown": "gpud is shutting down",
}


def cancel_error(reason: str) -> TaskError:
    """The error a task cancelled for `reason` finishes with."""
    return TaskError(reason, _CANCEL_MESSAGES.get(reason, "cancelled on request"))


@dataclass(eq=False)
class Task:
    """One submitted task. The runner that owns it moves its status; clients read its log."""

    request: TaskRequest
    preset: Preset
    id: str = field(default_factory=new_id)
    status: TaskStatus = TaskStatus.QUEUED
    session_id: str | None = None
    gpu_id: int | None = None
    container_id: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error: TaskError | None = None
    result: dict[str, Any] | None = None
    # Where its time went (the runner records the phases; reported on the task and in task_finish).
    timings: TaskTimings = field(default_factory=TaskTimings)
    # The bounds of the task's events and output (from settings, via the service).
    limits: EventLimits = field(default_factory=EventLimits)
    log: TaskEventLog = field(init=False)
    # Set by the runner while the task can be cancelled; called with a reason code.
    cancel_hook: CancelHook | None = None
    cancel_reason: str | None = None
    released: bool = False  # finished, and its events and output dropped (retention budget)
    output_truncated: bool = False  # the runner could not read the worker's output to its end
    # Once finished, the output lives only in the `text` event (the buffer is freed): one copy, not two.
    _text_event: Event | None = field(default=None, init=False, repr=False)
    # Called once when the task ends (the registry uses it for metrics and the records).
    on_finish: Callable[[Task], None] | None = None
    # Called when the task starts running (the registry records it).
    on_running: Callable[[Task], None] | None = None
    # Called at the task's first output (text or text_delta; the registry observes it).
    on_first_output: Callable[[Task], None] | None = None

    def __post_init__(self) -> None:
        self.log = TaskEventLog(self.id, limits=self.limits)

    @property
    def final(self) -> bool:
        """Whether the task has ended."""
        return self.status in FINAL

    @property
    def text(self) -> str:
        """The complete output so far (at most the output limit)."""
        if self._text_event is not None:
            return str(self._text_event.data["text"])
        return self.log.output.text

    @property
    def text_event(self) -> Event | None:
        """The finished task's `text` event (its whole output), while its events are kept."""
        return self._text_event

    def restore_ending(self, log: TaskEventLog) -> None:
        """Make `log`, the stored ending of this finished task (its `text` and `task_finish`), its log."""
        self.log = log
        self._text_event = next((e for e in log.events() if e.type is EventType.TEXT), None)
        finish = next((e for e in log.events() if e.type is EventType.TASK_FINISH), None)
        if finish is not None:
            self.timings = TaskTimings.from_report(finish.data.get("timings"), self.created_at)

    def emit(self, type: EventType, **data: Any) -> None:
        """Append an event to the task's stream (text deltas are also collected as the output, up to its limit)."""
        if type is EventType.TEXT_DELTA and data.get("delta"):
            self._output_began()
        self.log.append(type, data)

    def emit_delta(self, text: str) -> None:
        """emit(TEXT_DELTA, delta=text), for the many deltas of a streaming worker (no keyword dict)."""
        if text and self.timings.first_output_at is None:
            self._output_began()
        self.log.append_delta(text)

    def set_text(self, text: str) -> None:
        """Make `text` the whole output (a worker's complete text), cut at the output limit."""
        if text:
            self._output_began()
        self.log.output.replace(clean_text(text))

    def _output_began(self) -> None:
        if self.timings.first_output_at is None:
            self.timings.first_output_at = time.time()
            if self.on_first_output is not None:
                self.on_first_output(self)

    def mark_running(self) -> None:
        """The task has started on a worker."""
        if not self.final:
            self.status = TaskStatus.RUNNING
            self.started_at = time.time()
            tasklog.started(self)
            if self.on_running is not None:
                self.on_running(self)

    def finish(
        self,
        status: TaskStatus,
        *,
        error: TaskError | None = None,
        exit_code: int | None = None,
        text: str | None = None,
    ) -> bool:
        """End the task once: emit `text` (complete output) then `task_finish`. Returns False if already final."""
        if self.final:
            return False
        self.status = status
        self.finished_at = time.time()
        self.error = error
        self.exit_code = exit_code
        self.cancel_hook = None
        data: dict[str, Any] = {
            "status": status.value,
            "elapsed_seconds": round(self.elapsed(), 3),
            "gpu_id": self.gpu_id,
            "timings": self.timings.report(self.created_at, self.started_at, self.finished_at),
        }
        if self.output_truncated:
            data["output_truncated"] = True
        if error is not None:
            data["error"] = error.to_dict()
        if exit_code is not None:
            data["exit_code"] = exit_code
        try:
            if text is not None:
                self.set_text(text)
            if self.log.output or status is TaskStatus.COMPLETED:
                self._text_event = self.log.append_text()
        finally:
            # Whatever failed above, the stream must end: clients wait for task_finish.
            self.log.finish(data)
            if self._text_event is not None:
                self.log.output.replace("")
            if self.on_finish is not None:
                try:
                    self.on_finish(self)
                except Exception:
                    logger.exception("task %s: finish observer failed", self.id)
        tasklog.finished(self)
        return True

    def release(self) -> int:
        """Drop a finished task's stored events and output (its record stays); returns the bytes freed."""
        freed = self.log.release()
        if freed:
            self.released = True
            self._text_event = None  # the log let go of it; so must the record
        return freed

    def elapsed(self) -> float:
        """Seconds from submission to the end (or to now)."""
        return (self.finished_at or time.time()) - self.created_at

    async def cancel(self, reason: str = "cancelled") -> bool:
        """Ask the runner to cancel; False when the task is already final."""
        if self.final:
            return False
        self.cancel_reason = self.cancel_reason or reason
        if self.cancel_hook is not None:
            await self.cancel_hook(reason)
        return True

    def report(self, with_result: bool = False) -> dict[str, Any]:
        """The task as JSON for the API."""
        report: dict[str, Any] = {
            "task_id": self.id,
            "status": self.status.value,
            "task_type": self.request.task_type.value,
            "task_difficulty": self.request.difficulty,
            "model_id": self.request.model_id,
            "task_preset": self.request.preset,
            "session_id": self.session_id,
            "gpu_id": self.gpu_id,
            "container_id": self.container_id,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "elapsed_seconds": round(self.elapsed(), 3),
            "timings": self.timings.report(self.created_at, self.started_at, self.finished_at),
            "timeout_seconds": self.request.timeout_seconds,
            "exit_code": self.exit_code,
            "error": self.error.to_dict() if self.error else None,
            "events": self.log.last_id,
            "clients": self.log.subscribers,
        }
        if self.released:
            report["released"] = True  # its events and output were dropped to stay within the retention budget
        if self.output_truncated:
            report["output_truncated"] = True
        if with_result:
            report["text"] = self.text
            report["result"] = self.result
        return report
