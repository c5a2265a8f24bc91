"""The journal: tasks and sessions written to the records database as they change, and read back from it.

The registries call it at state changes only (a task added, running, finished; a session created, ready, ended,
and after each task with its counters), never per event. A finished task's row keeps its ending (`text` and
`task_finish` with their ids) so that its stream replays the same after a restart; an ended session's row keeps
what GET /api/sessions/{id} shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpud.clock import Clock, SystemClock, wall_of
from gpud.errors import Unavailable
from gpud.gpu.inventory import Gpu
from gpud.gpu.scheduler import Lease
from gpud.settings.presets import Preset
from gpud.state import Database, RecordsError, RowWriter, SessionRow, TaskRow, open_database
from gpud.work.events import EventType, TaskEventLog
from gpud.work.request import TaskRequest, TaskType
from gpud.work.sessions.record import Session, SessionState
from gpud.work.task import Task, TaskError, TaskStatus

logger = logging.getLogger(__name__)

DB_FILE = "gpud.db"
# Old rows are purged at most this often (a purge is one indexed DELETE per table).
PURGE_INTERVAL_SECONDS = 60.0
# A finished task's `text` is kept in its row up to this size; a longer output is replaced by a note (under the same
# event id), so the records stay small and writing them costs no big copies (outputs may be 16 MiB each).
RECORD_TEXT_MAX_BYTES = 1024 * 1024


def _log_purged(count: int) -> None:
    if count:
        logger.info("records: purged %d finished task(s) and ended session(s)", count)


def _soon(wake: Callable[[], None]) -> None:
    """Wake the records thread after the loop's callbacks already queued (its SSE writes, its message to a worker),
    not in the middle of them: woken at once, the thread contended for the GIL just as a task's first event or its
    task_finish was to be written. Without a running loop, now."""
    try:
        asyncio.get_running_loop().call_later(0, wake)
    except RuntimeError:
        wake()


def restart_event_id() -> int:
    """The first event id of a log made again after a restart: above any id issued before it (microseconds since
    the epoch), so a client reattaching with an older Last-Event-ID receives everything in it."""
    return int(time.time() * 1e6)


class Journal:
    """Writes Task and Session objects as rows (through a write-behind thread) and rebuilds finished ones; inert
    until open()."""

    def __init__(self, retention_seconds: Callable[[], float], clock: Clock | None = None) -> None:
        self._retention = retention_seconds
        self._clock = clock or SystemClock()
        self.db: Database | None = None
        self._writer: RowWriter | None = None
        self._purged_at = 0.0

    def open(self, state_dir: Path) -> Database | None:
        """Open (or create, or replace a corrupt) `<state_dir>/gpud.db`; blocking, so run it in an executor. When
        not even a new one can be made (a read-only or full disk), gpud runs without records, and says so."""
        try:
            self.db = open_database(state_dir / DB_FILE)
        except RecordsError as exc:
            logger.error("%s; running without records: work from before a restart is not known", exc)
            return None
        self._writer = RowWriter(self.db)
        return self.db

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every change so far is committed (tests; the writer commits at once anyway)."""
        return self._writer.flush(timeout) if self._writer is not None else True

    def close(self) -> None:
        """Write what is pending and close the database; later changes are no longer written."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.db is not None:
            self.db.close()
            self.db = None

    # --- writing -----------------------------------------------------------------------------------------

    def task_changed(self, task: Task) -> None:
        """Record the task as it is now (TaskRecords); its row is made now, written just after."""
        if self._writer is not None and self._writer.put(task_row(task), wake=False):
            _soon(self._writer.wake)

    def session_changed(self, session: Session) -> None:
        """Record the session as it is now (SessionRecords)."""
        if self._writer is not None and self._writer.put(session_row(session), wake=False):
            _soon(self._writer.wake)

    def purge(self) -> None:
        """Drop rows older than the record retention (at most once a minute, or once per retention if shorter)."""
        now, retention = time.time(), self._retention()
        if self._writer is None or now - self._purged_at < min(PURGE_INTERVAL_SECONDS, retention):
            return
        self._purged_at = now
        self._writer.purge(now - retention, _log_purged)

    # --- reading -----------------------------------------------------------------------------------------

    def stored_task(self, task_id: str) -> Task | None:
        """A finished task rebuilt read-only from its row (TaskRecords), or None."""
        row = self._read(lambda db: db.task(task_id))
        if not isinstance(row, TaskRow) or not row.final:
            return None  # an unfinished row is in memory (restored at start) or resolved by then
        task = task_from_row(row)
        task.restore_ending(ending_log(row))
        return task

    def stored_session(self, session_id: str) -> Session | None:
        """A session rebuilt read-only from its row (SessionRecords), or None."""
        row = self._read(lambda db: db.session(session_id))
        return session_from_row(row, self._clock) if isinstance(row, SessionRow) else None

    def _read(self, step: Callable[[Database], object]) -> object:
        if self.db is None:
            return None
        try:
            return step(self.db)
        except RecordsError as exc:
            logger.error("%s", exc)
            return None


# --- Task <-> row ----------------------------------------------------------------------------------------


def task_row(task: Task) -> TaskRow:
    """The row of a task as it is now (with its ending once finished)."""
    request = task.request
    return TaskRow(
        id=task.id,
        task_type=request.task_type.value,
        difficulty=request.difficulty,
        model_id=request.model_id,
        preset=request.preset,
        timeout_seconds=request.timeout_seconds,
        status=task.status.value,
        created_at=task.created_at,
        session_id=task.session_id,
        gpu_id=task.gpu_id,
        container_id=task.container_id,
        started_at=task.started_at,
        finished_at=task.finished_at,
        exit_code=task.exit_code,
        error_code=task.error.code if task.error else None,
        error_message=task.error.message if task.error else None,
        result=json.dumps(task.result) if task.result is not None else None,
        tail=_ending(task) if task.final else None,
    )


def _ending(task: Task) -> bytes:
    """The task's last events, from its `text` (if any) to `task_finish`, as `[[id, type, data], ...]`."""
    start = task.text_event.id if task.text_event is not None else task.log.last_id
    parts = []
    for event in task.log.events(start - 1):
        kind, data = event.type.value, event.json_bytes
        if event.type is EventType.TEXT and len(data) > RECORD_TEXT_MAX_BYTES:
            kind = EventType.LOGS.value
            note = f"the task's output ({len(data)} bytes) is too large to keep in gpud's records"
            data = json.dumps({"stream": "gpud", "line": note, "task_id": task.id}).encode()
        parts.append(b'[%d,"%s",%s]' % (event.id, kind.encode(), data))
    return b"[" + b",".join(parts) + b"]"


def ending_log(row: TaskRow) -> TaskEventLog:
    """The finished log a row's ending replays (a bare task_finish made from the row if none was kept)."""
    stored: list[Any] = []
    if row.tail:
        try:
            stored = json.loads(row.tail)
        except ValueError:
            logger.warning("task %s: its stored ending is unreadable; replaying its outcome only", row.id)
    if stored:
        first = int(stored[0][0])
        return TaskEventLog.replay_of(row.id, first, [(EventType(t), _encode(d)) for _, t, d in stored])
    data: dict[str, Any] = {"status": row.status, "task_id": row.id}
    if row.error_code:
        data["error"] = {"code": row.error_code, "message": row.error_message or ""}
    if row.exit_code is not None:
        data["exit_code"] = row.exit_code
    return TaskEventLog.replay_of(row.id, restart_event_id(), [(EventType.TASK_FINISH, _encode(data))])


def _encode(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def task_from_row(row: TaskRow, preset: Preset | None = None) -> Task:
    """A Task with the row's identity, place, status and times (its log is new and empty: the caller's part)."""
    request = TaskRequest(
        task_type=TaskType(row.task_type),
        difficulty=row.difficulty,
        model_id=row.model_id,
        preset=row.preset,
        timeout_seconds=row.timeout_seconds,
        session_id=row.session_id,
    )
    task = Task(
        request=request,
        preset=preset or Preset(model_id=row.model_id, name=row.preset, image=""),
        id=row.id,
        status=TaskStatus(row.status),
        session_id=row.session_id,
        gpu_id=row.gpu_id,
        container_id=row.container_id,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        exit_code=row.exit_code,
        error=TaskError(row.error_code, row.error_message or "") if row.error_code else None,
        result=json.loads(row.result) if row.result else None,
    )
    return task


# --- Session <-> row -------------------------------------------------------------------------------------


def session_row(session: Session) -> SessionRow:
    """The row of a session as it is now (times as epoch seconds)."""
    clock = session.clock
    return SessionRow(
        id=session.id,
        model_id=session.preset.model_id,
        preset=session.preset.name,
        difficulty=session.difficulty,
        gpu_index=session.lease.gpu.index,
        gpu_uuid=session.lease.gpu.uuid,
        state=session.state.value,
        created_at=wall_of(clock, session.created),
        last_active=wall_of(clock, session.last_active),
        container_id=session.container_id,
        ended_at=None if session.ended is None else wall_of(clock, session.ended),
        end_reason=session.end_reason,
        tasks_run=session.tasks_run,
        restarts=session.restarts,
        ready_info=json.dumps(session.ready_info) if session.ready_info else None,
    )


def monotonic_of(clock: Clock, wall: float) -> float:
    """The reading of `clock.monotonic()` at epoch time `wall` (the inverse of clock.wall_of)."""
    return clock.monotonic() - (clock.time() - wall)


class StoredSession(Session):
    """A session read back from the records: shown as it was, never run. One whose row says it was still live
    is being restored (gpud has not yet checked its container), so it takes no task yet."""

    def check_accepts(self, max_lifetime: float, queue_max: int) -> None:
        """Refuse tasks: 503 while it may still be adopted, else what an ended session says."""
        if not self.is_over:
            raise Unavailable(
                f"session {self.id} is being restored after gpud's restart; try again shortly",
                code="session_restoring",
                retry_after=2.0,
            )
        super().check_accepts(max_lifetime, queue_max)


def session_from_row(row: SessionRow, clock: Clock, preset: Preset | None = None) -> StoredSession:
    """A session object with the row's identity, GPU, state, times and counters."""
    gpu = Gpu(index=row.gpu_index, uuid=row.gpu_uuid, name="", difficulty=row.difficulty, real=False)
    lease = Lease(gpu=gpu, holder=row.id, kind="session", acquired_at=row.created_at)
    session = StoredSession(
        id=row.id,
        preset=preset or Preset(model_id=row.model_id, name=row.preset, image=""),
        difficulty=row.difficulty,
        lease=lease,
        clock=clock,
        state=SessionState(row.state),
        container_id=row.container_id,
        end_reason=row.end_reason,
        tasks_run=row.tasks_run,
        restarts=row.restarts,
        ready_info=json.loads(row.ready_info) if row.ready_info else {},
    )
    apply_times(session, row)
    return session


def apply_times(session: Session, row: SessionRow) -> None:
    """Set a session's timers (monotonic readings of its clock) from the row's epoch times."""
    session.created = monotonic_of(session.clock, row.created_at)
    session.last_active = monotonic_of(session.clock, row.last_active)
    session.ended = None if row.ended_at is None else monotonic_of(session.clock, row.ended_at)
