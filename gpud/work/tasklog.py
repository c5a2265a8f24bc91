"""The log line a task gets when it starts running and the one it gets when it ends.

Both carry the task's ids, type, model and GPU; the end adds its status and where its time went. The message reads
well as text; the same facts ride along as `extra` fields, so `log_format: json` puts them in the object as keys
(`event` is task_start or task_finish, `task_id`, `session_id`, `type`, `model`, `preset`, `gpu_id`, `status`,
and the durations in seconds).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Protocol

from gpud.work.request import TaskRequest
from gpud.work.timings import TaskTimings

# The task's own lines, under the logger name they always had (gpud.work.task wrote them before this module).
logger = logging.getLogger("gpud.work.task")


class _Named(Protocol):
    @property
    def value(self) -> str: ...


class _Error(Protocol):
    @property
    def code(self) -> str: ...

    @property
    def message(self) -> str: ...


class Task(Protocol):
    """What the lines read from a task (gpud.work.task.Task, which calls them: importing it here would be a cycle)."""

    @property
    def id(self) -> str: ...

    @property
    def session_id(self) -> str | None: ...

    @property
    def request(self) -> TaskRequest: ...

    @property
    def gpu_id(self) -> int | None: ...

    @property
    def status(self) -> _Named: ...

    @property
    def error(self) -> _Error | None: ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def created_at(self) -> float: ...

    @property
    def started_at(self) -> float | None: ...

    @property
    def finished_at(self) -> float | None: ...

    @property
    def timings(self) -> TaskTimings: ...

    def elapsed(self) -> float:
        """Seconds from submission to the end (or to now)."""


# Durations named in the text line of an ending, in order, with the word each gets there.
_SHOWN = (
    ("queue_wait_seconds", "queue wait"),
    ("model_fetch_seconds", "model fetch"),
    ("worker_start_seconds", "worker start"),
    ("first_output_seconds", "first output"),
    ("run_seconds", "run"),
)


def _ids(task: Task, event: str) -> dict[str, Any]:
    return {
        "event": event,
        "task_id": task.id,
        "session_id": task.session_id,
        "type": task.request.task_type.value,
        "model": task.request.model_id,
        "preset": task.request.preset,
        "gpu_id": task.gpu_id,
    }


def _where(task: Task) -> str:
    gpu = "" if task.gpu_id is None else f" on GPU {task.gpu_id}"
    session = "" if task.session_id is None else f" in session {task.session_id}"
    return f"{task.request.task_type.value} {task.request.model_id}/{task.request.preset}{gpu}{session}"


def started(task: Task) -> None:
    """Log that the task started running, with how long it waited."""
    if not logger.isEnabledFor(logging.INFO):  # the line's fields are work: none of it when it would be dropped
        return
    wait = None if task.started_at is None else round(max(0.0, task.started_at - task.created_at), 3)
    fields = {**_ids(task, "task_start"), "status": task.status.value, "queue_wait_seconds": wait}
    _info(fields, "task %s started: %s, waited %ss", task.id, _where(task), wait)


def finished(task: Task) -> None:
    """Log how the task ended: status, total time and phases, and the error (code: message) when it failed."""
    if not logger.isEnabledFor(logging.INFO):
        return
    timings = task.timings.report(task.created_at, task.started_at, task.finished_at)
    elapsed = round(task.elapsed(), 3)
    fields = {**_ids(task, "task_finish"), "status": task.status.value, "elapsed_seconds": elapsed, **timings}
    if task.error is not None:
        fields["error_code"] = task.error.code
    if task.exit_code is not None:
        fields["exit_code"] = task.exit_code
    phases = ", ".join(f"{word} {timings[key]}s" for key, word in _SHOWN if timings.get(key) is not None)
    error = f" ({task.error.code}: {task.error.message})" if task.error else ""
    _info(
        fields,
        "task %s %s: %s, %ss%s%s",
        task.id,
        task.status.value,
        _where(task),
        elapsed,
        f" ({phases})" if phases else "",
        error,
    )


def _info(fields: dict[str, Any], message: str, *args: Any) -> None:
    """Log the line after the loop's callbacks already queued (at the end of the next turn), not now: these lines
    come at a task's start and end, just as its `working` and `task_finish` events are to be written and its input
    sent to the worker, and writing a log line first delayed those. Its text and fields are as of now; the record's
    timestamp is at most a loop turn later. Without a running loop, now."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        logger.info(message, *args, extra=fields)
        return
    loop.call_later(0, functools.partial(logger.info, message, *args, extra=fields))
