"""How a session's tasks end with it, and the small pieces its teardown and runs share."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from gpud.runtime.base import LogLine, Stream
from gpud.work.sessions.record import Session, SessionState
from gpud.work.sessions.taskrun import stop_error
from gpud.work.sessions.worker import WorkerCrashed
from gpud.work.task import Task, TaskError, TaskStatus
from gpud.work.textcap import LongLines

logger = logging.getLogger(__name__)


def end_tasks(session: Session, crash: WorkerCrashed | None) -> None:
    """Finish the running and queued tasks of a session that is ending: failed after a crash, else cancelled."""
    if crash is not None:
        _fail(session, crash)
        return
    reason = session.stop_reason or "stopped"
    session.end_reason = reason
    for task in [session.current, *session.queue]:
        if task is not None:
            task.finish(TaskStatus.CANCELLED, error=stop_error(reason))
    session.queue.clear()
    if not session.is_over:
        session.move(SessionState.STOPPED)


def _fail(session: Session, crash: WorkerCrashed) -> None:
    message = crash.describe()
    logger.warning("session %s failed: %s", session.id, message)
    exit_code = crash.status.exit_code if crash.status else None
    for task in (crash.task, session.current):
        if task is not None:
            task.finish(TaskStatus.FAILED, error=TaskError(crash.code, message), exit_code=exit_code)
    session.end_reason = "worker_crashed"
    session.drop_queued(TaskStatus.FAILED, TaskError("session_failed", f"the session's worker failed: {message}"))
    if not session.is_over:
        session.move(SessionState.FAILED)


@contextlib.contextmanager
def logged(step: str) -> Iterator[None]:
    """Run one teardown step; a failure is logged, not raised, so the steps after it still run."""
    try:
        yield
    except Exception:
        logger.exception("%s failed", step)


def output_to(task: Task) -> Callable[[LogLine], None]:
    """Container output (outside the protocol) goes to the running task as `logs` events."""

    long_lines = LongLines()  # an over-long line arrives in pieces: one cut log line for all of them

    def forward(line: LogLine) -> None:
        stream = "stdout" if line.stream is Stream.STDOUT else "stderr"
        whole = long_lines.feed(stream, line.line, line.partial)
        if whole is not None:
            task.log.append_line(stream, *whole)

    return forward
