"""The records database (gpud/state) and the journal (gpud/work/journal.py): open, check, move a corrupt file
aside, write behind, purge; tasks and sessions as rows and back; the allocators' adoption of what survived."""

from __future__ import annotations

import logging
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from gpud.clock import ManualClock
from gpud.errors import Conflict, Unavailable
from gpud.gpu.inventory import open_inventory
from gpud.gpu.scheduler import Scheduler
from gpud.runtime.base import LABEL_INSTANCE, ContainerSpec
from gpud.runtime.instance import InstanceRuntime
from gpud.settings.presets import Preset
from gpud.state import SCHEMA_VERSION, RecordsError, RowWriter, SessionRow, TaskRow, instance_id, open_database
from gpud.work.events import EventType, TaskEventLog
from gpud.work.journal import (
    RECORD_TEXT_MAX_BYTES,
    Journal,
    ending_log,
    session_from_row,
    session_row,
    task_row,
)
from gpud.work.request import TaskRequest, TaskType
from gpud.work.sessions.record import Session, SessionState
from gpud.work.task import Task, TaskError, TaskStatus
from gpud.work.uids import WorkerIds


def a_task(**fields: object) -> Task:
    request = TaskRequest(TaskType.ONEOFF, "low", "m", "p", 30.0)
    return Task(request=request, preset=Preset("m", "p", "img"), **fields)  # type: ignore[arg-type]


def test_a_new_database_is_owner_only_in_wal_mode_with_the_schema(tmp_path: Path) -> None:
    db = open_database(tmp_path / "gpud.db")
    try:
        assert db.created and db.moved_aside is None
        assert stat.S_IMODE((tmp_path / "gpud.db").stat().st_mode) == 0o600
    finally:
        db.close()
    with sqlite3.connect(tmp_path / "gpud.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    again = open_database(tmp_path / "gpud.db")
    assert not again.created
    again.close()


@pytest.mark.parametrize("damage", ["garbage", "broken page", "newer schema"])
def test_an_unusable_database_is_moved_aside_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "gpud.db"
    db = open_database(path)
    db.put(tasks=[task_row(a_task())])
    db.close()
    if damage == "garbage":
        path.write_bytes(b"\xa5" * 8192)
    elif damage == "broken page":
        with open(path, "r+b") as file:
            file.seek(4096)  # the second page's b-tree header: the integrity check at open finds it
            file.write(b"\xff" * 12)
    else:
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA user_version = 99")
    with caplog.at_level(logging.WARNING, logger="gpud.state.db"):
        fresh = open_database(path)
    try:
        assert fresh.created and fresh.moved_aside is not None and fresh.moved_aside.exists()
        assert fresh.open_tasks() == []
        assert "is unusable" in caplog.text and str(fresh.moved_aside) in caplog.text
    finally:
        fresh.close()


def test_the_writer_commits_the_newest_version_of_each_row_and_purges(tmp_path: Path) -> None:
    db = open_database(tmp_path / "gpud.db")
    writer = RowWriter(db, batch_seconds=0)
    try:
        task = a_task()
        writer.put(task_row(task))
        task.mark_running()
        writer.put(task_row(task))
        assert writer.flush()
        assert [row.status for row in db.open_tasks()] == ["running"]
        task.finish(TaskStatus.COMPLETED, text="done")
        writer.put(task_row(task))
        purged: list[int] = []
        writer.purge(time.time() - 3600, purged.append)  # nothing is that old yet
        assert writer.flush() and purged == [0]
        assert db.open_tasks() == [] and db.task(task.id) is not None
        writer.purge(time.time() + 1, purged.append)
        assert writer.flush() and purged == [0, 1] and db.task(task.id) is None
    finally:
        writer.close()
        db.close()


def test_a_finished_tasks_row_replays_its_ending_with_the_same_ids() -> None:
    task = a_task()
    for word in ("alpha ", "beta"):
        task.emit(EventType.TEXT_DELTA, delta=word)
    task.result = {"load_count": 1}
    task.finish(TaskStatus.FAILED, error=TaskError("worker_failed", "exit 3"), exit_code=3)
    original = {e.id: (e.type, e.data) for e in task.log.events()}
    row = task_row(task)
    assert row.final and row.error_code == "worker_failed" and row.result == '{"load_count": 1}'
    replay = ending_log(row)
    assert replay.finished
    for event in replay.events():
        assert original[event.id] == (event.type, event.data)
    assert [e.type for e in replay.events()] == [EventType.TEXT, EventType.TASK_FINISH]
    assert replay.events()[-1].id == task.log.last_id
    # A client that saw everything gets nothing more; one that saw the first delta gets text and finish.
    assert replay.events(task.log.last_id) == []
    assert len(replay.events(1)) == 2


def test_a_huge_output_is_not_kept_in_the_row_but_its_place_is() -> None:
    task = a_task()
    task.emit(EventType.TEXT_DELTA, delta="x" * (RECORD_TEXT_MAX_BYTES + 10))
    task.finish(TaskStatus.COMPLETED)
    row = task_row(task)
    assert row.tail is not None and len(row.tail) < 4096
    replay = ending_log(row)
    note, finish = replay.events()
    assert (note.id, finish.id) == (task.log.last_id - 1, task.log.last_id)
    assert note.type is EventType.LOGS and "too large to keep" in note.data["line"]
    assert finish.type is EventType.TASK_FINISH and finish.data["status"] == "completed"


def test_the_journal_reads_back_only_finished_tasks(tmp_path: Path) -> None:
    journal = Journal(lambda: 3600.0)
    journal.open(tmp_path)
    try:
        running, done = a_task(), a_task()
        running.mark_running()
        done.finish(TaskStatus.COMPLETED, text="all of it")
        journal.task_changed(running)
        journal.task_changed(done)
        assert journal.flush()
        assert journal.stored_task(running.id) is None
        stored = journal.stored_task(done.id)
        assert stored is not None and stored.final and stored.text == "all of it"
        assert stored.report()["status"] == "completed"
    finally:
        journal.close()


def test_a_sessions_row_keeps_its_times_and_counters() -> None:
    clock = ManualClock()
    inventory = open_inventory("static", (0, 1), {})
    lease = Scheduler(inventory, clock).acquire("low", "s1", "session")
    session = Session("s1", Preset("m", "p", "img"), "low", lease, clock)
    clock._now += 50
    session.touch()
    session.tasks_run, session.ready_info = 3, {"load_count": 1}
    session.move(SessionState.READY)
    row = session_row(session)
    rebuilt = session_from_row(row, clock)
    assert rebuilt.report() == session.report()
    rebuilt_later = session_from_row(
        SessionRow(**{**row.__dict__, "state": "stopped", "ended_at": row.last_active}), clock
    )
    with pytest.raises(Exception, match="has ended"):
        rebuilt_later.check_accepts(3600, 5)
    with pytest.raises(Unavailable, match="being restored"):
        rebuilt.check_accepts(3600, 5)  # recorded live: it may still be adopted


def test_a_log_made_again_starts_above_the_old_ids_and_counts_its_own_events() -> None:
    log = TaskEventLog("t", first_id=1_000_000, max_events=3)
    first = log.append(EventType.LOGS, {"stream": "gpud", "line": "re-attached"})
    assert first is not None and first.id == 1_000_000
    for n in range(5):
        log.append(EventType.LOGS, {"stream": "stderr", "line": str(n)})
    assert log.dropped == 3  # max_events counts this log's events, not the ids
    assert [e.id for e in log.events(0)] == [1_000_000, 1_000_001, 1_000_002]


def test_the_scheduler_adopts_a_lease_once_and_withholds_new_ones() -> None:
    scheduler = Scheduler(open_inventory("static", (0, 1), {}))
    scheduler.withhold("checking what survived")
    with pytest.raises(Unavailable) as refused:
        scheduler.acquire("low", "t1", "task")
    assert refused.value.code == "gpus_not_reconciled"
    lease = scheduler.adopt(1, "s1", "session")
    with pytest.raises(Conflict):
        scheduler.adopt(1, "s2", "session")
    scheduler.withhold(None)
    assert scheduler.acquire("low", "t1", "task").gpu.index == 0
    assert scheduler.lease_of(1) is lease


def test_worker_ids_reserve_what_survived_and_hand_out_the_rest() -> None:
    ids = WorkerIds(100, 110, can_switch=True)
    assert ids.reserve(103, "s1") is not None
    assert ids.reserve(103, "s2") is None  # one uid, one worker
    assert ids.reserve(103, "s1") is not None  # the same holder again is fine
    assert [ids.acquire(f"h{n}") for n in range(4)] == [100, 101, 102, 104]
    assert ids.reserve(7, "fixed") is not None and ids.in_use == 5  # outside the range: not allocated
    user = ids.reserve(101, "s3")
    assert user is None  # h1 holds it


def test_the_instance_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = instance_id(tmp_path / "state")
    assert instance_id(tmp_path / "state") == first
    assert stat.S_IMODE((tmp_path / "state" / "instance-id").stat().st_mode) == 0o600
    (tmp_path / "state" / "instance-id").write_text("../../etc\n")
    assert instance_id(tmp_path / "state") != first


class _Recorder:
    name, isolated, capabilities = "rec", True, frozenset()

    def __init__(self) -> None:
        self.specs: list[ContainerSpec] = []
        self.filters: list[dict[str, str]] = []

    async def run(self, spec: ContainerSpec) -> str:
        self.specs.append(spec)
        return "c1"

    async def list(self, labels: dict[str, str]) -> list[object]:
        self.filters.append(dict(labels))
        return []


async def test_the_instance_runtime_labels_what_it_runs_and_lists_only_those() -> None:
    inner = _Recorder()
    runtime = InstanceRuntime(inner, "abc123")  # type: ignore[arg-type]
    await runtime.run(ContainerSpec(image="img", labels={"gpud.managed": "true"}))
    await runtime.list({"gpud.managed": "true"})
    assert inner.specs[0].labels == {"gpud.managed": "true", LABEL_INSTANCE: "abc123"}
    assert inner.filters == [{"gpud.managed": "true", LABEL_INSTANCE: "abc123"}]


def test_rows_of_closed_work_are_not_open(tmp_path: Path) -> None:
    row = TaskRow("t", "oneoff", "low", "m", "p", 30.0, "completed", time.time(), finished_at=time.time())
    assert row.final
    db = open_database(tmp_path / "gpud.db")
    try:
        db.put(tasks=[row, TaskRow("u", "session", "low", "m", "p", 30.0, "queued", time.time())])
        assert [r.id for r in db.open_tasks()] == ["u"]
    finally:
        db.close()


def test_a_database_that_cannot_be_opened_is_not_moved_and_gpud_runs_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "gpud.db").mkdir()  # not corrupt, just not openable: nothing may be moved aside
    with pytest.raises(RecordsError):
        open_database(tmp_path / "gpud.db")
    journal = Journal(lambda: 3600.0)
    with caplog.at_level(logging.ERROR):
        assert journal.open(tmp_path) is None
    assert "running without records" in caplog.text
    journal.task_changed(a_task())  # a no-op, not an error
    assert [p.name for p in tmp_path.iterdir()] == ["gpud.db"]
