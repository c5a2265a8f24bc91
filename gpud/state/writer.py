"""Write-behind for the records: rows are handed over from the event loop and committed by one thread.

A commit costs 0.1-0.4 ms on a disk even without an fsync (the WAL append and its index), several times per task:
done on the event loop, that was a fifth of a warm session's task round trip. Handed over instead, a change costs
the loop a dict store; the thread commits whatever has gathered (the newest version of each row) in one
transaction, at once when idle, so a row reaches the file within a commit's time of its change. A `kill -9` can
lose only the rows handed over and not yet committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from gpud.state.db import Database, RecordsError
from gpud.state.rows import SessionRow, TaskRow

logger = logging.getLogger(__name__)

# How long the writer lets changes gather before a commit (at most this much is lost to a kill -9).
BATCH_SECONDS = 0.02
# Failed commits (a full disk) are logged the first time and then every this many.
_LOG_EVERY = 1000


class RowWriter:
    """Commits rows in a thread of its own; the only writer of its database while it runs."""

    def __init__(self, db: Database, batch_seconds: float = BATCH_SECONDS) -> None:
        self._db = db
        self._batch_seconds = batch_seconds
        self._lock = threading.Condition()
        self._tasks: dict[str, TaskRow] = {}
        self._sessions: dict[str, SessionRow] = {}
        self._purge_before: float | None = None
        self._purged: Callable[[int], None] | None = None
        self._written = 0  # batches committed (or failed): flush() waits for the count to move
        self._handed = 0
        self._closing = False
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="gpud-records", daemon=True)
        self._thread.start()

    def put(self, row: TaskRow | SessionRow, wake: bool = True) -> bool:
        """Hand a row over (the newest version of a row replaces one not yet written). The writer is woken once
        per batch, by the first row after it went idle; with `wake=False` not here: then True means the caller
        must call wake() (soon: the row waits until then)."""
        with self._lock:
            # The writer waits only while nothing is pending: waking it once per batch is enough (a notify is
            # several microseconds of Python, paid on the event loop for every change).
            idle = not (self._tasks or self._sessions)
            if isinstance(row, TaskRow):
                self._tasks[row.id] = row
            else:
                self._sessions[row.id] = row
            self._handed += 1
            if idle and wake:
                self._lock.notify_all()  # all: a flush() may be waiting on the same condition
        return idle and not wake

    def wake(self) -> None:
        """Wake the writer for what was handed over with put(wake=False)."""
        with self._lock:
            self._lock.notify_all()

    def purge(self, before: float, done: Callable[[int], None] | None = None) -> None:
        """Delete rows that ended before `before` (epoch), in the writer's thread; `done` gets the count there."""
        with self._lock:
            self._purge_before, self._purged = before, done
            self._handed += 1
            self._lock.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything handed over so far is committed; False on time-out."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._lock.notify_all()  # rows put with wake=False may not have woken it yet
            target = self._handed
            while self._written < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        """Write what is pending, then stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(30.0)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._tasks or self._sessions or self._purge_before is not None or self._closing):
                    self._lock.wait()
            if self._batch_seconds and not self._closing:
                time.sleep(self._batch_seconds)  # let the changes of this moment gather into one commit
            with self._lock:
                tasks, sessions = list(self._tasks.values()), list(self._sessions.values())
                self._tasks, self._sessions = {}, {}
                purge, purged = self._purge_before, self._purged
                self._purge_before = self._purged = None
                target, closing = self._handed, self._closing
            self._commit(tasks, sessions, purge, purged)
            with self._lock:
                self._written = target
                self._lock.notify_all()
                if closing and not (self._tasks or self._sessions or self._purge_before is not None):
                    return

    def _commit(
        self,
        tasks: list[TaskRow],
        sessions: list[SessionRow],
        purge: float | None,
        purged: Callable[[int], None] | None,
    ) -> None:
        try:
            if tasks or sessions:
                self._db.put(tasks, sessions)
            if purge is not None:
                count = self._db.purge(purge)
                if purged is not None:
                    purged(count)
        except RecordsError as exc:
            # gpud keeps working without its records (a full disk): they only matter after a restart.
            self.failures += 1
            if self.failures % _LOG_EVERY == 1:
                logger.error("%s (%d failed commit(s) so far)", exc, self.failures)
        except Exception:
            logger.exception("records: writing failed unexpectedly")
