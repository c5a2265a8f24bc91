"""Session timers and queue on a manual clock: idle timeout, keepalive, max lifetime, task timeout, FIFO, limits.

The session manager, scheduler, model store, channel and SDK are the real ones, and so is the worker: the example
stream_text worker as a process (process runtime). Only time is injected, so hours pass in a call.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpud.clock import ManualClock
from gpud.errors import Busy, Gone
from gpud.gpu.inventory import open_inventory
from gpud.gpu.scheduler import Scheduler
from gpud.modelstore import ModelStore
from gpud.runtime.process import ProcessRuntime
from gpud.settings import LiveConfig, load
from gpud.settings.presets import Limits, Preset, PresetCatalog
from gpud.work.event import EventType
from gpud.work.request import TaskRequest, TaskType
from gpud.work.sessions.manager import SessionManager
from gpud.work.sessions.record import Session, SessionState
from gpud.work.sessions.taskrun import CANCEL_GRACE_SECONDS
from gpud.work.task import Task, TaskStatus
from gpud.work.uids import WorkerIds
from gpud.worker.install import install_sdk
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
IDLE = 300.0
LIFETIME = 3600.0
QUEUE = 3


@dataclass
class Harness:
    """A session manager over real parts, on a manual clock."""

    clock: ManualClock
    manager: SessionManager
    scheduler: Scheduler
    preset: Preset
    tasks: list[Task] = field(default_factory=list)

    def task(self, timeout: float = 60.0, **metadata: Any) -> Task:
        request = TaskRequest(TaskType.SESSION, "low", self.preset.model_id, self.preset.name, timeout, metadata)
        task = Task(request=request, preset=self.preset)
        self.tasks.append(task)
        return task

    async def open(self, **metadata: Any) -> tuple[Session, Task]:
        """A ready session whose first task has completed."""
        first = self.task(max_tokens=2, delay=0.0, **metadata)
        session = self.manager.open(first, self.scheduler.acquire("low", f"s{len(self.tasks)}", "session"))
        await finished(first)
        assert first.status is TaskStatus.COMPLETED, first.error
        return session, first


async def finished(task: Task, timeout: float = 10.0) -> Task:
    await wait_until(lambda: task.final, f"task {task.id} to finish", timeout=timeout)
    return task


def saw(task: Task, status: str) -> bool:
    return any(e.type is EventType.WORKER and e.data.get("status") == status for e in task.log.events())


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    (models / "m" / "tokens.txt").write_text("one two three four five\n")
    shutil.copy(REPO / "examples" / "workers" / "stream_text.py", tmp_path / "stream_text.py")
    install_sdk(tmp_path / "sdk")
    preset = Preset(
        model_id="m",
        name="stream",
        image="unused",
        command=("python3", str(tmp_path / "stream_text.py")),
        limits=Limits(),
        mode="session",
        user="root",  # the process runtime would otherwise drop to the worker's uid, which cannot read pytest's tmp dir
    )
    environ = {
        "SESSION_IDLE_TIMEOUT_SECONDS": str(IDLE),
        "SESSION_MAX_LIFETIME_SECONDS": str(LIFETIME),
        "SESSION_QUEUE_MAX_SIZE": str(QUEUE),
    }
    config = LiveConfig(load(None, environ=environ), PresetCatalog({"m": {"stream": preset}}))
    clock = ManualClock()
    scheduler = Scheduler(open_inventory("static", (0, 1), {0: "low", 1: "low"}), clock)
    runtime = ProcessRuntime()
    store = ModelStore(models, file_service_url=None, internal_key=None, auto_fetch=False)
    (tmp_path / "sockets").mkdir()
    ids = WorkerIds(*config.settings.worker_uid_range)
    manager = SessionManager(runtime, store, scheduler, config, tmp_path / "sockets", tmp_path / "sdk", clock, ids=ids)
    harness = Harness(clock, manager, scheduler, preset)
    try:
        yield harness
    finally:
        await manager.shutdown()
        await runtime.close()
        assert scheduler.leases() == []


async def test_an_idle_session_ends_at_the_idle_timeout(harness: Harness) -> None:
    session, _ = await harness.open()
    await harness.clock.advance(IDLE - 1)
    assert session.state is SessionState.READY
    await harness.clock.advance(2)
    await wait_until(lambda: session.is_over, "the idle session to end")
    assert session.end_reason == "idle_timeout" and session.state is SessionState.STOPPED
    assert harness.scheduler.leases() == []


async def test_keepalive_and_tasks_reset_the_idle_timer(harness: Harness) -> None:
    session, _ = await harness.open()
    await harness.clock.advance(IDLE - 10)
    harness.manager.keepalive(session)
    await harness.clock.advance(IDLE - 10)
    task = harness.task(max_tokens=1, delay=0.0)
    harness.manager.enqueue(session, task)
    await finished(task)
    await harness.clock.advance(IDLE - 10)
    assert session.state is SessionState.READY and session.tasks_run == 2
    await harness.clock.advance(20)
    await wait_until(lambda: session.is_over, "the idle session to end")
    assert session.end_reason == "idle_timeout"


async def test_max_lifetime_lets_the_running_task_finish_and_refuses_new_ones(harness: Harness) -> None:
    session, _ = await harness.open()
    running = harness.task(timeout=2 * LIFETIME, max_tokens=20, delay=0.02)
    harness.manager.enqueue(session, running)
    await wait_until(lambda: running.status is TaskStatus.RUNNING, "the task to run")
    await harness.clock.advance(LIFETIME)
    with pytest.raises(Gone) as refused:
        harness.manager.enqueue(session, harness.task())
    assert refused.value.code == "session_expired"
    await finished(running)
    assert running.status is TaskStatus.COMPLETED and running.text.count(" ") == 19
    await wait_until(lambda: session.is_over, "the session to end")
    assert session.end_reason == "max_lifetime"
    with pytest.raises(Gone) as ended:
        harness.manager.keepalive(session)
    assert ended.value.code == "session_ended"


async def test_the_queue_is_fifo_and_bounded(harness: Harness) -> None:
    session, _ = await harness.open()
    running = harness.task(max_tokens=10, delay=0.02)
    harness.manager.enqueue(session, running)
    await wait_until(lambda: running.status is TaskStatus.RUNNING, "the task to run")
    queued = [harness.task(max_tokens=1, delay=0.0, prompt=str(i)) for i in range(QUEUE)]
    for task in queued:
        harness.manager.enqueue(session, task)
    with pytest.raises(Busy) as full:
        harness.manager.enqueue(session, harness.task())
    assert full.value.code == "session_queue_full"
    positions = [[e.data["queue_position"] for e in t.log.events() if "queue_position" in e.data] for t in queued]
    assert [p[0] for p in positions] == [1, 2, 3]
    for task in queued:
        await finished(task)
    order = sorted(queued, key=lambda t: t.started_at or 0)
    assert order == queued and all(t.status is TaskStatus.COMPLETED for t in queued)
    assert session.tasks_run == 2 + QUEUE


async def test_a_task_past_its_timeout_is_cancelled_and_the_model_stays_loaded(harness: Harness) -> None:
    session, first = await harness.open()
    slow = harness.task(timeout=30.0, max_tokens=10_000, delay=0.01)
    harness.manager.enqueue(session, slow)
    await wait_until(lambda: slow.text, "the first tokens")
    await harness.clock.advance(29)
    assert slow.status is TaskStatus.RUNNING
    await harness.clock.advance(2)
    await finished(slow)
    assert slow.status is TaskStatus.TIMEOUT and slow.error and "30s" in slow.error.message
    after = harness.task(max_tokens=1, delay=0.0)
    harness.manager.enqueue(session, after)
    await finished(after)
    assert after.status is TaskStatus.COMPLETED and session.restarts == 0
    assert session.ready_info["load_count"] == 1


async def test_a_worker_that_ignores_the_timeout_is_restarted(harness: Harness) -> None:
    session, _ = await harness.open()
    stuck = harness.task(timeout=30.0, max_tokens=3, delay=2.0, ignore_cancel=True)
    harness.manager.enqueue(session, stuck)
    await wait_until(lambda: stuck.status is TaskStatus.RUNNING, "the stuck task to run")
    await harness.clock.advance(31)  # the timeout: cancel is sent, and ignored
    assert not stuck.final
    await harness.clock.advance(CANCEL_GRACE_SECONDS + 1)
    await finished(stuck)
    assert stuck.status is TaskStatus.TIMEOUT and stuck.error and "restarted" in stuck.error.message
    await wait_until(lambda: session.state is SessionState.READY, "the restarted worker to be ready")
    assert session.restarts == 1
