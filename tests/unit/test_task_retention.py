"""TaskRegistry's byte budget: the oldest finished tasks are released first, readers last, and a task's end costs
the same however many finished tasks are retained (it once sorted all of them at every task's end)."""

from __future__ import annotations

import pytest

from gpud.settings.presets import Preset
from gpud.work.events import EventType, TaskEventLog
from gpud.work.registry import TaskRegistry
from gpud.work.request import TaskRequest, TaskType
from gpud.work.task import Task, TaskStatus


def make_task() -> Task:
    request = TaskRequest(TaskType.SESSION, "low", "m", "p", 10.0)
    return Task(request=request, preset=Preset(model_id="m", name="p", image="i"))


def finished(registry: TaskRegistry, size: int = 10_000) -> Task:
    task = make_task()
    registry.add(task)
    task.emit(EventType.TEXT_DELTA, delta="d" * size)  # with its text event: about 2 * size bytes
    task.finish(TaskStatus.COMPLETED)
    return task


def test_a_task_end_reads_a_constant_number_of_logs_however_many_are_retained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = TaskRegistry(lambda: 600.0, retention_bytes=lambda: 1 << 40)
    for _ in range(2000):
        finished(registry, size=10)
    reads = []
    original = TaskEventLog.retained_bytes

    def counted(self: TaskEventLog) -> int:
        reads.append(self.task_id)
        return original.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(TaskEventLog, "retained_bytes", property(counted))
    for _ in range(10):
        finished(registry, size=10)
    # Before: every retained task's log was read (and all of them sorted) at each end: 20,000+ reads here.
    assert len(reads) <= 10 * 2, len(reads)


def test_over_the_budget_the_oldest_go_first_and_a_read_task_last_in_its_place() -> None:
    registry = TaskRegistry(lambda: 600.0, retention_bytes=lambda: 70_000)
    first = finished(registry)
    with first.log.attach():  # a client is replaying the oldest task
        others = [finished(registry) for _ in range(3)]  # 4 x 20 kB: over 70 kB, the oldest unread one goes
        assert not first.released and [t.released for t in others] == [True, False, False]
        more = finished(registry)  # still over: the next unread one, not the one being read
        assert not first.released and [t.released for t in [*others, more]] == [True, True, False, False]
    last = finished(registry)  # nobody reads the first any more: it is the oldest, so it goes now
    assert first.released and not last.released
    assert registry.retained_bytes() <= 70_000 + 1000


def test_a_task_being_read_goes_only_when_releasing_the_others_is_not_enough() -> None:
    budget = [30_000]
    registry = TaskRegistry(lambda: 600.0, retention_bytes=lambda: budget[0])
    read = finished(registry)
    with read.log.attach():
        newest = finished(registry)  # 40 kB: the newest goes, since the older one is being read
        assert newest.released and not read.released
        budget[0] = 10_000  # a reload lowers the budget: releasing every unread task cannot meet it
        small = finished(registry, size=100)
        assert small.released and read.released


def test_purge_forgets_old_tasks_and_their_bytes_no_longer_count() -> None:
    registry = TaskRegistry(lambda: 600.0, retention_bytes=lambda: 50_000)
    old = [finished(registry) for _ in range(2)]
    assert not any(t.released for t in old)
    assert registry.purge(now=max(t.finished_at or 0 for t in old) + 601) == 2
    fresh = [finished(registry) for _ in range(2)]  # 40 kB: within budget once the forgotten ones do not count
    assert not any(t.released for t in fresh)


def test_a_task_with_nothing_to_release_still_counts_until_forgotten() -> None:
    registry = TaskRegistry(lambda: 600.0, retention_bytes=lambda: 1)
    bare = make_task()
    registry.add(bare)
    bare.finish(TaskStatus.CANCELLED)  # only task_finish: nothing to release
    assert not bare.released
    task = finished(registry)
    assert task.released and not bare.released
    assert registry.purge(now=(task.finished_at or 0) + 601) == 2
