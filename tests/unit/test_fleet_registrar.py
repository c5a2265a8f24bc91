"""The fleet registrar publishes what changed from the registries' notifications: a sync tick with nothing new costs
the same with 20,000 retained tasks as with none (it once built frozensets of every retained id every 50 ms), a
new id is written at once (not at the next tick), a burst is one transaction per TXN_IDS ids, and an id forgotten
before it was written is never written. Real TaskRegistry and SessionRegistry, an in-memory etcd stand-in."""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from types import SimpleNamespace
from typing import Any

import pytest

from gpud.fleet.local import LocalSource
from gpud.fleet.registration import TXN_IDS, Registrar
from gpud.fleet.view import GpuState
from gpud.settings.presets import Preset
from gpud.work.registry import TaskRegistry
from gpud.work.request import TaskRequest, TaskType
from gpud.work.sessions.record import SessionRegistry
from gpud.work.task import Task, TaskStatus

GPUS = (GpuState(0, "low", False, False, True), GpuState(1, "high", False, False, True))


class MemoryEtcd:
    """The EtcdClient calls the registrar makes, kept in a dict; counts transactions and puts."""

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.txns: list[int] = []  # ops per transaction
        self.puts = 0
        self.lease = 0

    async def grant(self, ttl: int) -> int:
        self.lease += 1
        return self.lease

    async def keepalive(self, lease: int) -> int:
        return 5

    async def get(self, key: str) -> None:
        return None

    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        self.puts += 1
        self.kv[key] = value.decode() if isinstance(value, bytes) else value
        return 1

    async def txn(self, ops: list[dict[str, Any]]) -> None:
        self.txns.append(len(ops))
        for op in ops:
            if "request_put" in op:
                self.kv[unb64(op["request_put"]["key"])] = unb64(op["request_put"]["value"])
            else:
                self.kv.pop(unb64(op["request_delete_range"]["key"]), None)

    async def revoke(self, lease: int) -> None:
        return None

    def claims(self, kind: str) -> set[str]:
        prefix = f"/gpud/{kind}/"
        return {key[len(prefix) :] for key in self.kv if key.startswith(prefix)}


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def make_task() -> Task:
    request = TaskRequest(TaskType.SESSION, "low", "m", "p", 10.0)
    return Task(request=request, preset=Preset(model_id="m", name="p", image="i"))


def retained(registry: TaskRegistry, count: int) -> list[Task]:
    """`count` finished tasks kept by the registry (as a busy host keeps them for GPUD_TASK_RETENTION_SECONDS)."""
    tasks = []
    for _ in range(count):
        task = make_task()
        registry.add(task)
        task.finish(TaskStatus.COMPLETED)
        tasks.append(task)
    return tasks


class Host:
    """A registrar wired to real registries as gpud/fleet/service.py wires it, with snapshot calls counted."""

    def __init__(self) -> None:
        self.tasks = TaskRegistry(lambda: 600.0, retention_bytes=lambda: 1 << 40)
        self.sessions = SessionRegistry()
        self.local = LocalSource(self.sessions, self.tasks, lambda: GPUS)
        self.etcd = MemoryEtcd()
        self.registrar = Registrar(
            self.etcd,  # type: ignore[arg-type]
            "h1",
            "http://h1",
            "test",
            5,
            self.local.snapshot,
            self.local.status,
        )
        self.local.listen(self.registrar.changed)
        self.loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.loop = asyncio.create_task(self.registrar.run())
        deadline = time.monotonic() + 5
        while self.registrar.registered_at is None:
            assert time.monotonic() < deadline, self.registrar.error
            await asyncio.sleep(0.001)

    async def stop(self) -> None:
        await self.registrar.stop()
        assert self.loop is not None
        await asyncio.wait_for(self.loop, 5)


async def published(etcd: MemoryEtcd, kind: str, ids: set[str], present: bool = True, timeout: float = 2.0) -> float:
    """Seconds until every id in `ids` is (or, with present=False, is no longer) claimed in `etcd`."""
    keys = [f"/gpud/{kind}/{i}" for i in ids]
    started = time.perf_counter()
    while not all((key in etcd.kv) is present for key in keys):
        assert time.perf_counter() - started < timeout, f"{kind} not {'published' if present else 'removed'}"
        await asyncio.sleep(0)
    return time.perf_counter() - started


async def tick_seconds(host: Host, ticks: int) -> list[float]:
    """How long each of `ticks` sync ticks with nothing new takes (the registrar's status read and compare)."""
    took = []
    original = host.registrar._status

    def timed() -> Any:
        started = time.perf_counter()
        status = original()
        took.append(time.perf_counter() - started)
        return status

    host.registrar._status = timed
    while len(took) < ticks:
        await asyncio.sleep(0.01)
    host.registrar._status = original
    return took[:ticks]


async def test_a_tick_with_nothing_new_does_not_scan_the_retained_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    small, busy = Host(), Host()
    retained(busy.tasks, 20_000)
    for host in (small, busy):
        await host.start()
    ids = {t.id for t in busy.tasks.all()}
    assert busy.etcd.claims("tasks") == ids  # the registration's full snapshot put them all
    started = time.perf_counter()
    busy.local.snapshot()
    snapshot_cost = time.perf_counter() - started  # what every 50 ms tick used to cost
    scans: list[str] = []
    for cls in (TaskRegistry, SessionRegistry):
        original = cls.all
        monkeypatch.setattr(cls, "all", lambda self, o=original: scans.append(type(self).__name__) or o(self))
    puts, txns = busy.etcd.puts, len(busy.etcd.txns)
    small_ticks = await tick_seconds(small, 20)
    busy_ticks = await tick_seconds(busy, 20)  # 20 ticks of 50 ms: a second with nothing new
    assert scans == [] and busy.registrar.snapshots == 1, scans
    assert busy.etcd.puts == puts and len(busy.etcd.txns) == txns  # nothing changed, nothing written
    tick_small, tick_busy = statistics.median(small_ticks), statistics.median(busy_ticks)
    print(
        f"\nregistrar tick (median of 20): {tick_small * 1e6:.0f} us with no retained task, {tick_busy * 1e6:.0f} us "
        f"with 20,000; the full snapshot each tick used to take: {snapshot_cost * 1e3:.1f} ms"
    )
    assert tick_busy < max(5 * tick_small, 0.0005), (tick_small, tick_busy)
    assert tick_busy * 20 < snapshot_cost, (tick_busy, snapshot_cost)
    for host in (small, busy):
        await host.stop()


async def test_new_ids_are_written_at_once_in_batches_and_forgotten_ones_removed() -> None:
    host = Host()
    retained(host.tasks, 1000)
    await host.start()
    etcd = host.etcd
    txns = len(etcd.txns)
    burst = [make_task() for _ in range(2 * TXN_IDS + 20)]
    for task in burst:  # one burst, in one loop iteration: 3 transactions
        host.tasks.add(task)
    took = await published(etcd, "tasks", {t.id for t in burst})
    assert etcd.txns[txns:] == [2 * TXN_IDS, 2 * TXN_IDS, 40], etcd.txns[txns:]  # a claim and its record per id
    assert etcd.kv[f"/gpud/~records/tasks/{burst[0].id}"] == "h1"
    single = make_task()
    started = time.perf_counter()
    host.tasks.add(single)
    one = await published(etcd, "tasks", {single.id})
    print(f"\nregistrar: a burst of {len(burst)} ids written in {took * 1e3:.1f} ms, one new id in {one * 1e3:.2f} ms")
    assert time.perf_counter() - started < 0.05  # not the next 50 ms tick: the loop woke at once
    # An id added and forgotten before the registrar wrote it is never written.
    txns = len(etcd.txns)
    fleeting = make_task()
    host.tasks.add(fleeting)
    for task in [*burst, single, fleeting]:
        task.finish(TaskStatus.COMPLETED)
    host.tasks.purge(now=time.time() + 10_000)  # every finished task is forgotten
    await published(etcd, "tasks", {t.id for t in burst}, present=False)
    assert etcd.claims("tasks") == set() and not any(k.startswith("/gpud/~records/tasks/") for k in etcd.kv)
    assert len(etcd.txns) - txns == -(-(1000 + len(burst) + 1) // TXN_IDS)  # the fleeting one was never written
    # Sessions go the same way (a stand-in with the fields the registry reads).
    session = SimpleNamespace(id="s1", created=0.0, ended=None, is_over=False)
    host.sessions.add(session)  # type: ignore[arg-type]
    await published(etcd, "sessions", {"s1"})
    await asyncio.sleep(0.12)  # two status ticks: the record counts the live session
    assert '"sessions": 1' in etcd.kv["/gpud/hosts/h1"], etcd.kv["/gpud/hosts/h1"]
    session.ended, session.is_over = 1.0, True
    host.sessions.purge(older_than=2.0)
    await published(etcd, "sessions", {"s1"}, present=False)
    await host.stop()
