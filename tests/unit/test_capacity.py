"""Which idle session new work may end (gpud/work/capacity.py), and the scheduler's reservation that hands the freed
GPU to that work alone. Real scheduler, session manager and session records; the records are placed in each state
directly (the state table's own moves), so every state is seen at once without timing. The eviction end to end, on
real workers over HTTP, is tests/integration/test_session_eviction.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpud.clock import ManualClock
from gpud.errors import Gone, Unavailable
from gpud.gpu.inventory import open_inventory
from gpud.gpu.scheduler import Scheduler
from gpud.modelstore import ModelStore
from gpud.runtime.process import ProcessRuntime
from gpud.settings import LiveConfig, load
from gpud.settings.presets import Preset, PresetCatalog
from gpud.work.capacity import Capacity
from gpud.work.request import TaskRequest, TaskType
from gpud.work.sessions.manager import SessionManager
from gpud.work.sessions.record import Session, SessionState
from gpud.work.task import Task
from gpud.work.uids import WorkerIds

PRESET = Preset(model_id="m", name="stream", image="unused", mode="session")
# GPUs 0-4 low, 5 high.
TAGS = {0: "low", 1: "low", 2: "low", 3: "low", 4: "low", 5: "high"}


@dataclass
class Parts:
    clock: ManualClock
    scheduler: Scheduler
    manager: SessionManager
    capacity: Capacity

    def session(self, name: str, gpu: int, state: SessionState, last_active: float) -> Session:
        """A registered session record holding `gpu`, moved to `state`, last used at `last_active`."""
        lease = self.scheduler.adopt(gpu, name, "session")
        session = Session(id=name, preset=PRESET, difficulty=TAGS[gpu], lease=lease, clock=self.clock)
        if state is not SessionState.STARTING:
            session.move(SessionState.READY)
        if state is SessionState.WORKING:
            session.move(SessionState.WORKING)
            session.current = task()
        session.last_active = last_active
        self.manager.registry.add(session)
        return session


def task() -> Task:
    return Task(request=TaskRequest(TaskType.SESSION, "low", "m", "stream", 60.0), preset=PRESET)


async def parts_for(tmp_path: Path, environ: dict[str, str]) -> AsyncIterator[Parts]:
    config = LiveConfig(load(None, environ=environ), PresetCatalog({"m": {"stream": PRESET}}))
    clock = ManualClock()
    scheduler = Scheduler(open_inventory("static", tuple(TAGS), TAGS), clock)
    runtime = ProcessRuntime()
    store = ModelStore(tmp_path / "models", file_service_url=None, internal_key=None, auto_fetch=False)
    ids = WorkerIds(*config.settings.worker_uid_range)
    manager = SessionManager(runtime, store, scheduler, config, tmp_path / "sockets", tmp_path / "sdk", clock, ids=ids)
    try:
        yield Parts(clock, scheduler, manager, Capacity(scheduler, manager, config))
    finally:
        await runtime.close()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    async for made in parts_for(tmp_path, {}):
        yield made


@pytest.fixture
async def parts_off(tmp_path: Path) -> AsyncIterator[Parts]:
    async for made in parts_for(tmp_path, {"GPUD_SESSION_EVICT_IDLE": "false"}):
        yield made


def test_only_the_least_recently_used_idle_session_of_the_tier_is_picked(parts: Parts) -> None:
    parts.session("working", 0, SessionState.WORKING, last_active=1.0)
    queued = parts.session("queued", 1, SessionState.READY, last_active=2.0)
    queued.queue.append(task())
    parts.session("starting", 2, SessionState.STARTING, last_active=3.0)
    parts.session("drained", 3, SessionState.READY, last_active=4.0)
    parts.scheduler.drain(3)
    parts.session("high", 5, SessionState.READY, last_active=0.0)  # the oldest of all, but of the other tier
    idle = parts.session("idle", 4, SessionState.READY, last_active=9.0)
    assert parts.capacity.idle_victim("low") is idle
    assert getattr(parts.capacity.idle_victim("high"), "id", None) == "high"
    idle.stop_reason = "evicted"  # picked (or killed) already: never picked twice
    assert parts.capacity.idle_victim("low") is None
    # Once undrained, the drained GPU's idle session is a candidate again.
    parts.scheduler.undrain(3)
    assert getattr(parts.capacity.idle_victim("low"), "id", None) == "drained"


def test_of_two_idle_sessions_the_older_is_picked(parts: Parts) -> None:
    parts.session("a", 0, SessionState.READY, last_active=5.0)
    parts.session("b", 1, SessionState.READY, last_active=3.0)
    assert getattr(parts.capacity.idle_victim("low"), "id", None) == "b"


async def test_with_no_idle_session_acquire_is_the_503_and_marks_nothing(parts: Parts) -> None:
    held = [parts.session(f"s{gpu}", gpu, SessionState.WORKING, last_active=1.0) for gpu in range(5)]
    with pytest.raises(Unavailable) as refused:
        await parts.capacity.acquire("low", "new", "session")
    assert refused.value.code == "no_gpu_available" and refused.value.retry_after
    with pytest.raises(Unavailable):
        parts.capacity.check("low")
    assert all(s.stop_reason is None for s in held)


def test_check_passes_for_a_tier_of_idle_sessions_and_ends_nothing(parts: Parts) -> None:
    idle = [parts.session(f"s{gpu}", gpu, SessionState.READY, last_active=1.0) for gpu in range(5)]
    parts.capacity.check("low")
    assert all(s.stop_reason is None and s.state is SessionState.READY for s in idle)


def test_with_eviction_off_an_idle_tier_is_the_503(parts_off: Parts) -> None:
    parts = parts_off
    for gpu in range(5):
        parts.session(f"s{gpu}", gpu, SessionState.READY, last_active=1.0)
    with pytest.raises(Unavailable) as refused:
        parts.capacity.check("low")
    assert refused.value.code == "no_gpu_available"


def test_a_session_marked_evicted_answers_410_session_evicted(parts: Parts) -> None:
    idle = parts.session("idle", 0, SessionState.READY, last_active=1.0)
    idle.stop_reason = "evicted"
    with pytest.raises(Gone) as gone:
        parts.manager.enqueue(idle, task())
    assert gone.value.code == "session_evicted" and "evicted" in gone.value.message
    with pytest.raises(Gone) as gone:
        parts.manager.keepalive(idle)
    assert gone.value.code == "session_evicted"


def test_a_reserved_gpu_goes_only_to_its_holder() -> None:
    scheduler = Scheduler(open_inventory("static", (0, 1), {0: "low", 1: "low"}))
    old = scheduler.acquire("low", "old", "session")
    other = scheduler.acquire("low", "other", "task")
    scheduler.reserve(0, "new")
    scheduler.release(old)
    # Free, but kept for "new": anyone else (and a bare check) finds the tier full.
    with pytest.raises(Unavailable) as refused:
        scheduler.acquire("low", "intruder", "task")
    assert refused.value.code == "no_gpu_available"
    with pytest.raises(Unavailable):
        scheduler.check("low")
    scheduler.release(other)
    assert scheduler.acquire("low", "intruder", "task").gpu.index == 1, "an unreserved GPU is anyone's"
    lease = scheduler.acquire("low", "new", "session")
    assert lease.gpu.index == 0 and scheduler.lease_of(0) is lease
    scheduler.release(lease)
    assert scheduler.acquire("low", "later", "task").gpu.index == 0, "the reservation ends with the lease"


def test_a_reservation_given_up_frees_the_gpu_for_anyone() -> None:
    scheduler = Scheduler(open_inventory("static", (0,), {0: "low"}))
    scheduler.reserve(0, "new")
    scheduler.unreserve(0, "someone-else")  # only the holder's own reservation is dropped
    with pytest.raises(Unavailable):
        scheduler.acquire("low", "intruder", "task")
    scheduler.unreserve(0, "new")
    assert scheduler.acquire("low", "intruder", "task").gpu.index == 0


def test_a_holder_prefers_the_gpu_kept_for_it() -> None:
    scheduler = Scheduler(open_inventory("static", (0, 1), {0: "low", 1: "low"}))
    scheduler.reserve(1, "new")
    assert scheduler.acquire("low", "new", "session").gpu.index == 1, "GPU 1 was freed for it, though 0 is lower"


def test_gone_is_not_raised_for_other_ended_sessions(parts: Parts) -> None:
    killed = parts.session("killed", 0, SessionState.READY, last_active=1.0)
    killed.stop_reason = "killed"
    with pytest.raises(Gone) as gone:
        parts.manager.enqueue(killed, task())
    assert gone.value.code == "session_ended"
