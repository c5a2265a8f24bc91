"""The task registry: active tasks, and finished ones for their retention period, within a byte budget."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Protocol

from gpud.errors import NotFound
from gpud.work.task import Task, TaskStatus

logger = logging.getLogger(__name__)


class TaskRecords(Protocol):
    """Where tasks are recorded durably (gpud.work.journal): written at each change, read back after memory."""

    def task_changed(self, task: Task) -> None:
        """Record the task as it is now."""

    def stored_task(self, task_id: str) -> Task | None:
        """A finished task rebuilt from its record, or None."""


class TaskRegistry:
    """Active tasks, and finished ones for a retention period (so streams can be replayed after the end).

    Finished tasks also share a byte budget: past it, the oldest finished tasks' events and output are released
    (their records stay until the retention period ends), so retention cannot hold gigabytes. With `records`, each
    task is also recorded when added, running and finished, and one no longer in memory is read back from there."""

    def __init__(
        self,
        retention_seconds: Callable[[], float],
        on_finish: Callable[[Task], None] | None = None,
        retention_bytes: Callable[[], int] | None = None,
        records: TaskRecords | None = None,
        on_running: Callable[[Task], None] | None = None,
        on_first_output: Callable[[Task], None] | None = None,
    ) -> None:
        self._tasks: dict[str, Task] = {}
        # Finished tasks holding events, oldest first, with their bytes (summed in _held_bytes): trimming pops from
        # the front (sorting every retained task at each task's end made a round trip grow with retention).
        self._held: collections.OrderedDict[str, tuple[Task, int]] = collections.OrderedDict()
        self._held_bytes = 0
        self._fixed: dict[str, int] = {}  # finished tasks with nothing to release: counted in _held_bytes too
        self._retention = retention_seconds
        self._retention_bytes = retention_bytes or (lambda: 512 * 1024 * 1024)
        self._on_finish = on_finish
        self._on_running = on_running
        self._records = records
        self._on_first_output = on_first_output
        self._watcher: Callable[[bool, Task], None] | None = None

    def watch(self, watcher: Callable[[bool, Task], None]) -> None:
        """Call `watcher(True, task)` when a task is added and `watcher(False, task)` when it is forgotten (fleet
        mode publishes the ids this host holds from these, rather than scanning every retained task)."""
        self._watcher = watcher

    def add(self, task: Task) -> None:
        """Register a new task."""
        self._tasks[task.id] = task
        if self._watcher is not None:
            self._watcher(True, task)
        task.on_finish = self._finished
        task.on_running = self._running
        task.on_first_output = self._on_first_output
        if task.final:  # ended before (not through _finished): counted against the byte budget all the same
            self._hold(task)
        elif task.status is TaskStatus.RUNNING and self._on_running is not None:
            self._on_running(task)  # started before it was added (sent to an idle session's worker at once)
        if self._records is not None:
            self._records.task_changed(task)

    def _running(self, task: Task) -> None:
        if self._on_running is not None:
            self._on_running(task)
        if self._records is not None:
            self._records.task_changed(task)

    def _finished(self, task: Task) -> None:
        if self._on_finish is not None:
            self._on_finish(task)
        if self._records is not None:
            self._records.task_changed(task)  # before the trim below may release its output
        self._hold(task)
        self._trim()  # at once, not at the next purge: a burst of big outputs must not pile up meanwhile

    def get(self, task_id: str) -> Task:
        """The task, or NotFound (a task no longer in memory is read back from the records)."""
        task = self._tasks.get(task_id)
        if task is None and self._records is not None:
            task = self._records.stored_task(task_id)
        if task is None:
            raise NotFound(f"no task {task_id!r} (finished tasks are kept for a while, then forgotten)")
        return task

    def all(self) -> list[Task]:
        """Every known task, oldest first."""
        return sorted(self._tasks.values(), key=lambda t: t.created_at)

    def active(self) -> list[Task]:
        """Tasks not yet final."""
        return [t for t in self._tasks.values() if not t.final]

    def retained_bytes(self) -> int:
        """Bytes held by finished tasks' events and output."""
        return sum(t.log.retained_bytes for t in self._tasks.values() if t.final)

    def purge(self, now: float | None = None) -> int:
        """Forget finished tasks older than the retention period, then release the oldest finished tasks' events
        while the rest are over the byte budget; returns how many were forgotten."""
        cutoff = (now or time.time()) - self._retention()
        old = [t.id for t in self._tasks.values() if t.final and (t.finished_at or 0) < cutoff]
        for task_id in old:
            task = self._tasks.pop(task_id)
            if self._watcher is not None:
                self._watcher(False, task)
            held = self._held.pop(task_id, None)
            self._held_bytes -= held[1] if held is not None else self._fixed.pop(task_id, 0)
        self._trim()
        return len(old)

    def _hold(self, task: Task) -> None:
        """Count a finished task's events against the byte budget (once; a released task holds nothing more)."""
        if not (task.released or task.id in self._held or task.id in self._fixed):
            self._held[task.id] = (task, task.log.retained_bytes)
            self._held_bytes += task.log.retained_bytes

    def _trim(self) -> None:
        """Release the oldest finished tasks' events until the rest fit the byte budget; tasks that a client is
        still reading go last. Costs nothing under the budget; over it, each task is released (and popped) once."""
        excess = self._held_bytes - self._retention_bytes()
        if excess <= 0:
            return
        reading: list[tuple[str, tuple[Task, int]]] = []
        while excess > 0 and self._held:
            task_id, held = self._held.popitem(last=False)
            if held[0].log.subscribers > 0:
                reading.append((task_id, held))
            else:
                excess -= self._release(task_id, held)
        for n, (task_id, held) in enumerate(reading):
            if excess <= 0:  # the rest were not needed: back to the front, in their order
                for kept_id, kept in reversed(reading[n:]):
                    self._held[kept_id] = kept
                    self._held.move_to_end(kept_id, last=False)
                return
            excess -= self._release(task_id, held)

    def _release(self, task_id: str, held: tuple[Task, int]) -> int:
        """Release one task taken off _held; returns the bytes freed."""
        task, size = held
        freed = task.release()
        if freed:
            logger.info("task %s: released %d bytes of finished output (retention budget)", task.id, freed)
            self._held_bytes -= size
        else:  # nothing to release (no event but task_finish): its bytes still count, until it is forgotten
            self._fixed[task_id] = size
        return freed
