"""The records database: SQLite in WAL mode in the state directory, checked at open, moved aside when corrupt.

Written from the event loop at state changes only (never per event), so each write is one small transaction;
WAL with synchronous=NORMAL makes a commit a write to the log without an fsync (a power cut may lose the last
commits, never corrupt the file). Container labels stay the source of truth for what runs; these rows add what
labels cannot hold (timers, counters, outcomes) and let finished work answer after a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from gpud.state.rows import ENDED_SESSION_STATES, FINAL_TASK_STATUSES, SessionRow, TaskRow

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_R = TypeVar("_R", TaskRow, SessionRow)

_SCHEMA = """
CREATE TABLE tasks (
    id TEXT PRIMARY KEY, task_type TEXT NOT NULL, difficulty TEXT NOT NULL, model_id TEXT NOT NULL,
    preset TEXT NOT NULL, timeout_seconds REAL NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    session_id TEXT, gpu_id INTEGER, container_id TEXT, started_at REAL, finished_at REAL, exit_code INTEGER,
    error_code TEXT, error_message TEXT, result TEXT, tail BLOB
);
CREATE INDEX tasks_finished_at ON tasks (finished_at);
CREATE INDEX tasks_status ON tasks (status);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY, model_id TEXT NOT NULL, preset TEXT NOT NULL, difficulty TEXT NOT NULL,
    gpu_index INTEGER NOT NULL, gpu_uuid TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
    last_active REAL NOT NULL, container_id TEXT, ended_at REAL, end_reason TEXT, tasks_run INTEGER NOT NULL,
    restarts INTEGER NOT NULL, ready_info TEXT
);
CREATE INDEX sessions_ended_at ON sessions (ended_at);
"""


class RecordsError(Exception):
    """The records database could not be read or written."""


class Database:
    """One open records database. Methods raise RecordsError. Writes (put, purge) go through one connection,
    meant for one thread at a time (gpud.state.writer's); reads through another, so a reader never sees or joins
    a write transaction in progress (WAL lets both proceed at once)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, created: bool, moved_aside: Path | None) -> None:
        self._conn = conn
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self.path = path
        self.created = created  # no database was there: nothing from before a restart is known
        self.moved_aside = moved_aside  # where an unusable file was moved (then `created` is True too)
        self._task_sql = _upsert("tasks", TaskRow)
        self._session_sql = _upsert("sessions", SessionRow)

    def put(self, tasks: Iterable[TaskRow] = (), sessions: Iterable[SessionRow] = ()) -> None:
        """Write rows (whole rows: the newest version of each wins), in one transaction."""
        with self._errors("write"), _transaction(self._conn):
            self._conn.executemany(self._task_sql, map(_TASK_VALUES, tasks))
            self._conn.executemany(self._session_sql, map(_SESSION_VALUES, sessions))

    def task(self, task_id: str) -> TaskRow | None:
        """One task's row."""
        rows = self._select(TaskRow, "SELECT * FROM tasks WHERE id = ?", (task_id,))
        return rows[0] if rows else None

    def session(self, session_id: str) -> SessionRow | None:
        """One session's row."""
        rows = self._select(SessionRow, "SELECT * FROM sessions WHERE id = ?", (session_id,))
        return rows[0] if rows else None

    def open_tasks(self) -> list[TaskRow]:
        """Tasks that had not ended when last written (gpud stopped without finishing them)."""
        marks = ",".join("?" * len(FINAL_TASK_STATUSES))
        sql = f"SELECT * FROM tasks WHERE status NOT IN ({marks}) ORDER BY created_at"
        return self._select(TaskRow, sql, FINAL_TASK_STATUSES)

    def open_sessions(self) -> list[SessionRow]:
        """Sessions that had not ended when last written."""
        marks = ",".join("?" * len(ENDED_SESSION_STATES))
        sql = f"SELECT * FROM sessions WHERE state NOT IN ({marks}) ORDER BY created_at"
        return self._select(SessionRow, sql, ENDED_SESSION_STATES)

    def purge(self, before: float) -> int:
        """Delete finished tasks and ended sessions whose end is before `before` (epoch); returns the count."""
        with self._errors("purge"), _transaction(self._conn):
            tasks = self._conn.execute("DELETE FROM tasks WHERE finished_at < ?", (before,)).rowcount
            sessions = self._conn.execute("DELETE FROM sessions WHERE ended_at < ?", (before,)).rowcount
        return int(tasks) + int(sessions)

    def close(self) -> None:
        """Checkpoint and close (a later open finds everything in the main file)."""
        self._reader.close()
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def _select(self, kind: type[_R], sql: str, args: Iterable[Any]) -> list[_R]:
        with self._errors("read"):
            return [kind(*row) for row in self._reader.execute(sql, tuple(args)).fetchall()]

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise RecordsError(f"records database {self.path}: {what} failed: {exc}") from exc


def _values(kind: type) -> operator.attrgetter[Any]:
    """A row's values in column order, as a tuple (dataclasses.astuple deep-copies each value: rows hold only
    plain immutable ones, so that was pure cost, on the records thread but holding the GIL)."""
    return operator.attrgetter(*(f.name for f in dataclasses.fields(kind)))


_TASK_VALUES = _values(TaskRow)
_SESSION_VALUES = _values(SessionRow)


def _upsert(table: str, kind: type) -> str:
    names = [f.name for f in dataclasses.fields(kind)]
    return f"INSERT OR REPLACE INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"


def open_database(path: Path) -> Database:
    """Open (or create) the database at `path`; a corrupt or unknown-version file is moved aside as
    `<name>.corrupt-<time>` with a warning and a new one is created. Raises RecordsError when the file cannot be
    opened at all (permissions, a full or read-only disk, another process holding it): that is no corruption,
    and moving it aside would lose good records."""
    try:
        return _open(path, moved_aside=None)
    except (_Unusable, sqlite3.DatabaseError) as exc:
        if isinstance(exc, sqlite3.OperationalError):
            raise RecordsError(f"cannot open the records database {path}: {exc}") from exc
        problem = str(exc)
    aside = _move_aside(path)
    logger.warning(
        "records database %s is unusable (%s): moved to %s and a new one created; what still runs is rebuilt from "
        "container labels, and tasks and sessions from before are forgotten",
        path, problem, aside,
    )  # fmt: skip
    try:
        return _open(path, moved_aside=aside)
    except (_Unusable, sqlite3.Error) as exc:
        raise RecordsError(f"cannot create the records database {path}: {exc}") from exc


def _open(path: Path, moved_aside: Path | None) -> Database:
    try:
        conn, created = _connect(path)
        return Database(conn, path, created=created or moved_aside is not None, moved_aside=moved_aside)
    except OSError as exc:
        raise RecordsError(f"cannot open the records database {path}: {exc}") from exc


class _Unusable(Exception):
    """The file opened but cannot be used (failed integrity check, a schema from a newer gpud)."""


def _connect(path: Path) -> tuple[sqlite3.Connection, bool]:
    created = not path.exists() or path.stat().st_size == 0
    # Created owner-only before SQLite opens it: rows hold task outputs. The -wal and -shm files take its mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise _Unusable(f"journal mode {mode!r} instead of wal")
        conn.execute("PRAGMA synchronous=NORMAL")
        check = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
        if check != ["ok"]:
            raise _Unusable("integrity check: " + "; ".join(str(c) for c in check[:3]))
        _ensure_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn, created


def _ensure_schema(conn: sqlite3.Connection) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version == SCHEMA_VERSION:
        return
    if version != 0:
        raise _Unusable(f"schema version {version}, this gpud knows {SCHEMA_VERSION}")
    with _transaction(conn):
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK when the block raises (the connection is in autocommit mode otherwise)."""
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # an error may have ended the transaction already
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        with contextlib.suppress(FileNotFoundError):
            source.rename(f"{aside}{suffix}")
    return aside
