"""Issue 11: gpud's own restart neither kills nor duplicates the work it manages. A real `gpud run` on Podman with
10 live sessions is killed with SIGKILL and started again on the same state, five times in a row; with live
restore off the same kill leaves nothing behind; a lost or corrupt records database is rebuilt from container
labels; a one-off running at the kill is re-attached and its outcome recorded."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpud.runtime.base import GpuDevice
from gpud.runtime.instance import InstanceRuntime
from gpud.runtime.spec import build_spec
from gpud.settings.presets import Preset
from tests.figures import Figures
from tests.integration.conftest import engine_socket
from tests.reliability.restartable import (
    Restartable,
    close_restartable,
    fresh_client,
    open_restartable,
    open_sessions,
    seconds_in_log,
    settle,
)
from tests.security.isolation_kit import Stream
from tests.waiting import wait_until

SESSIONS = 10
ROUNDS = 5
LONG = {"max_tokens": 100_000, "delay": 0.05}  # a task that runs until gpud is killed under it
ADOPTED = r"session \w+ adopted in ([0-9.]+)s"
RECONCILED = r"reconciled \d+ container\(s\) in ([0-9.]+)s"


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Restartable]:
    opened = await open_restartable(tmp_path, engine_socket("podman"), gpus=SESSIONS)
    try:
        yield opened
    finally:
        left = await close_restartable(opened)
        assert not left, f"containers left after a clean stop: {left}"


async def make_busy(host: Restartable, client: aiohttp.ClientSession, sessions: list[str]) -> dict[str, Stream]:
    """Sessions 0-3 run a long task; 4-6 run one with two more queued behind it; 7-9 stay idle. Returns every
    unfinished task's stream by task id, once each is running or queued and recorded."""
    streams: list[Stream] = []
    for index, session_id in enumerate(sessions[:7]):
        streams.append(await host.submit(client, host.body(session_id=session_id, **LONG)))
        if index >= 4:
            for _ in range(2):
                streams.append(await host.submit(client, host.body(session_id=session_id, max_tokens=2, delay=0)))
    for stream in streams:
        await wait_until(lambda s=stream: s.find(lambda e: e.data.get("status") in ("working", "queued")), "state")
    by_id = {stream.task_id: stream for stream in streams}
    await host.recorded(by_id)
    return by_id


async def check_after_restart(
    host: Restartable,
    client: aiohttp.ClientSession,
    before: dict[str, dict[str, Any]],
    containers: dict[str, str],
    pending: dict[str, Stream],
    tasks_run: int,
) -> None:
    """Every session as before (id, GPU, container, times, counters), nothing orphaned or twice, each GPU one holder,
    the tasks cut by the kill failed `gpud_restarted` (also for a client coming back with its Last-Event-ID)."""
    sessions = host.sessions()
    assert set(sessions) == set(before), (set(sessions) ^ set(before), host.log)
    for session_id, report in sessions.items():
        assert report["gpu_id"] == before[session_id]["gpu_id"]
        assert report["state"] == "ready" and report["worker"]["load_count"] == 1, report
        assert report["tasks_run"] == tasks_run, report  # the tasks cut by the kill never finished: not counted
        assert abs(report["created_at"] - before[session_id]["created_at"]) < 0.5, report
    running = await host.containers(running_only=True)
    by_session = [c.labels.get("gpud.session_id") for c in running]
    assert sorted(by_session) == sorted(before), "orphan or duplicate session containers"
    assert {c.labels["gpud.session_id"]: c.id for c in running} == containers, "a session container was replaced"
    assert len({c.labels["gpud.gpu_uuid"] for c in running}) == len(running), "two containers on one GPU"
    assert len(await host.containers()) == len(running), "a leftover (exited) container"
    leases = host.leases()
    assert sorted(leases.values()) == sorted(before) and len(set(leases.values())) == len(leases)
    for task_id, stream in pending.items():
        status, task = await host.get(client, f"/api/tasks/{task_id}")
        assert status == 200 and task["status"] == "failed", task
        assert task["error"]["code"] == "gpud_restarted", task
        seen = stream.events[-1].id if stream.events else 0
        replay = await host.events(client, task_id, seen)
        assert replay and replay[-1].event == "task_finish", replay
        assert replay[-1].data["error"]["code"] == "gpud_restarted" and replay[-1].id > seen


async def run_one_each(host: Restartable, client: aiohttp.ClientSession, sessions: list[str]) -> float:
    """A new task in every session at once: each completes on its loaded model. Returns the slowest's seconds."""
    started = time.monotonic()
    streams = [await host.submit(client, host.body(session_id=s, max_tokens=3, delay=0)) for s in sessions]
    for stream in streams:
        finish = await stream.end()
        assert finish["status"] == "completed", finish
        status, task = await host.get(client, f"/api/tasks/{stream.task_id}")
        assert status == 200 and task["result"]["load_count"] == 1, task
    return time.monotonic() - started


@pytest.mark.timeout(1200)
async def test_kill_9_five_times_with_ten_live_sessions(host: Restartable, figures: Figures) -> None:
    scenario = "kill -9 x5, 10 sessions"
    figures.record(scenario, "first start: seconds to READY", host.start(), "s")
    async with fresh_client() as client:
        sessions = await open_sessions(host, client, SESSIONS)
        before = host.sessions()
        containers = {c.labels["gpud.session_id"]: c.id for c in await host.containers(running_only=True)}
        assert len(containers) == SESSIONS
        ready_times, reconciles, adoptions = [], [], []
        for round_ in range(ROUNDS):
            pending = await make_busy(host, client, sessions)
            host.kill9()
            await settle(pending.values())
            ready_times.append(host.start())
            log = host.log
            reconciles += seconds_in_log(log, RECONCILED)
            adoptions += seconds_in_log(log, ADOPTED)
            assert len(seconds_in_log(log, ADOPTED)) == SESSIONS, log
            await check_after_restart(host, client, before, containers, pending, tasks_run=1 + round_)
            first_task = await run_one_each(host, client, sessions)
            figures.record(scenario, f"restart {round_ + 1}: 10 new tasks, slowest (s)", first_task, "s")
        for n, seconds in enumerate(ready_times, 1):
            figures.record(scenario, f"restart {n}: seconds to READY", seconds, "s")
        figures.record(scenario, "reconciliation, median", statistics.median(reconciles), "s")
        figures.record(scenario, "reconciliation, max", max(reconciles), "s")
        figures.record(scenario, "adoption per session, median", statistics.median(adoptions), "s")
        figures.record(scenario, "adoption per session, max", max(adoptions), "s")
        figures.record(scenario, "sessions adopted in all", len(adoptions))


@pytest.mark.timeout(600)
async def test_with_live_restore_off_a_restart_leaves_nothing(host: Restartable, figures: Figures) -> None:
    scenario = "kill -9, live restore off"
    host.start()
    async with fresh_client() as client:
        sessions = await open_sessions(host, client, SESSIONS - 1)  # and a one-off on the tenth GPU
        pending = await make_busy(host, client, sessions)
        oneoff = await host.submit(client, host.body("oneoff", "oneoff", max_tokens=1000, delay=0.05))
        await oneoff.wait("working")
        pending[oneoff.task_id] = oneoff
        await host.recorded(pending)
        assert len(await host.containers()) == SESSIONS
        host.kill9()
        await settle(pending.values())
        figures.record(scenario, "seconds to READY", host.start(GPUD_LIVE_RESTORE="false"), "s")
        ready = time.monotonic()

        async def nothing_left() -> bool:
            return not await host.containers() and not host.leases()

        await wait_until(nothing_left, "no container and no lease", timeout=5.0)
        figures.record(scenario, "READY to 0 containers, all GPUs free", time.monotonic() - ready, "s")
        assert host.sessions() == {}
        for session_id in sessions:
            report = host.admin("GET", f"/api/sessions/{session_id}")
            assert report["state"] == "stopped" and report["end_reason"] == "gpud_restarted", report
        for task_id in pending:
            status, task = await host.get(client, f"/api/tasks/{task_id}")
            assert status == 200 and task["status"] == "failed" and task["error"]["code"] == "gpud_restarted"
        assert not [p for p in (host.state / "sessions").iterdir()], "stale session directories"
        assert not [p for p in (host.state / "tasks").iterdir()], "stale task directories"
        assert "live restore is off" in host.log


@pytest.mark.timeout(600)
@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
async def test_a_lost_database_is_rebuilt_from_labels(host: Restartable, figures: Figures, damage: str) -> None:
    host.start()
    async with fresh_client() as client:
        sessions = await open_sessions(host, client, 3)
        before = host.sessions()
        containers = {c.labels["gpud.session_id"]: c.id for c in await host.containers(running_only=True)}
        busy = await host.submit(client, host.body(session_id=sessions[0], **LONG))
        await busy.wait("working")
        host.kill9()
        await settle([busy])
        if damage == "deleted":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{host.db}{suffix}").unlink(missing_ok=True)
        else:
            # The first pages of the file and of its write-ahead log (which holds the newest pages): garbage.
            for path in (host.db, Path(f"{host.db}-wal")):
                if path.exists():
                    with open(path, "r+b") as file:
                        file.write(b"\xa5" * 8192)
        figures.record(f"database {damage}", "seconds to READY", host.start(), "s")
        log = host.log
        if damage == "deleted":
            assert "is new" in log and "rebuilt from container labels alone" in log, log
        else:
            assert "is unusable" in log and "moved to" in log, log
            assert list(host.state.glob("gpud.db.corrupt-*")), "the corrupt file was not kept aside"
        assert log.count("adopting container") == 3, log  # each session: "no record of it ... from its labels"
        assert host.sessions().keys() == before.keys()
        assert {s: r["gpu_id"] for s, r in host.sessions().items()} == {s: r["gpu_id"] for s, r in before.items()}
        running = await host.containers(running_only=True)
        assert {c.labels["gpud.session_id"]: c.id for c in running} == containers, "a session was started twice"
        assert len(await host.containers()) == len(containers)
        await run_one_each(host, client, sessions)
        # The busy task's record went with the database: unknown now, not invented.
        status, _ = await host.get(client, f"/api/tasks/{busy.task_id}")
        assert status == 404


@pytest.mark.timeout(600)
async def test_a_oneoff_running_at_the_kill_is_reattached(tmp_path: Path, figures: Figures) -> None:
    host = await open_restartable(tmp_path, engine_socket("podman"), gpus=2)
    try:
        await _oneoff_reattached(host, figures)
    finally:
        left = await close_restartable(host)
        assert not left, left


async def _oneoff_reattached(host: Restartable, figures: Figures) -> None:
    host.start()
    words = " ".join(f"w{i}" for i in range(60))
    async with fresh_client() as client:
        stream = await host.submit(client, host.body("oneoff", "oneoff", prompt=words, delay=0.1))
        await wait_until(lambda: "w5" in stream.text, "some output before the kill")
        gpu = next(e.data["gpu_id"] for e in stream.events if e.data.get("status") == "gpu_allocated")
        await host.recorded([stream.task_id])
        host.kill9()
        await settle([stream])
        seen = stream.events[-1].id
        figures.record("one-off at the kill", "seconds to READY", host.start(), "s")
        status, task = await host.get(client, f"/api/tasks/{stream.task_id}")
        assert status == 200 and task["status"] == "running" and task["gpu_id"] == gpu, task
        assert host.leases() == {gpu: stream.task_id}
        # The re-attached one-off holds its GPU: new work lands on the other one, never on the same.
        other = await host.submit(client, host.body("oneoff", "oneoff", prompt="x y", delay=0))
        assert (await other.end())["status"] == "completed"
        assert next(e.data["gpu_id"] for e in other.events if e.data.get("status") == "gpu_allocated") != gpu
        replay = await host.events(client, stream.task_id, seen)
        finish = replay[-1]
        assert finish.event == "task_finish" and finish.data["status"] == "completed", finish
        assert finish.data.get("exit_code") == 0 and finish.id > seen
        notes = [e.data["line"] for e in replay if e.event == "logs" and e.data.get("stream") == "gpud"]
        assert any("read again from its start" in line for line in notes), notes
        status, task = await host.get(client, f"/api/tasks/{stream.task_id}")
        assert task["status"] == "completed" and task["text"].split() == words.split(), task["text"]
        assert host.leases() == {}  # at task_finish; the container is removed just after

        async def removed() -> bool:
            return await host.containers() == []

        await wait_until(removed, "the re-attached one-off's container to be removed", timeout=10.0)
        assert "re-attached to its container" in host.log


async def plant(
    host: Restartable, preset: str, command: list[str], gpu: int, session_id: str | None = None
) -> tuple[str, str]:
    """A container as an earlier gpud of this instance could have left it (its labels, its instance id, a worker
    uid of its own); its id and its task id."""
    instance = (host.state / "instance-id").read_text().strip()
    uid = 2_000_065_000 + len(await host.containers())
    spec = build_spec(
        Preset(host.model_id, preset, "gpud-worker-python:latest", command=tuple(command)),
        user=f"{uid}:{uid}",
        task_id=(task_id := uuid.uuid4().hex),
        session_id=session_id,
        gpu=GpuDevice(str(gpu), f"GPU-static-{gpu}"),
        stop_grace_seconds=1,
    )
    return await InstanceRuntime(host.engine, instance).run(spec), task_id


@pytest.mark.timeout(600)
async def test_duplicates_and_dead_leftovers_are_removed_and_unknown_work_adopted(tmp_path: Path) -> None:
    host = await open_restartable(tmp_path, engine_socket("podman"), gpus=4)
    try:
        host.start()
        async with fresh_client() as client:
            sessions = await open_sessions(host, client, 2)
            gpus = {s: r["gpu_id"] for s, r in host.sessions().items()}
            host.kill9()
            taken = gpus[sessions[1]]
            twin, _ = await plant(host, "stream", ["sleep", "600"], taken, session_id=uuid.uuid4().hex)
            dead, _ = await plant(host, "stream", ["true"], 2, session_id=uuid.uuid4().hex)
            lost, oneoff_task = await plant(host, "oneoff", ["sh", "-c", "echo from-a-lost-gpud; sleep 10"], 2)
            mute_id = uuid.uuid4().hex
            mute, _ = await plant(host, "stream", ["sleep", "600"], 3, session_id=mute_id)  # never reconnects
            await wait_until(lambda: _exited(host, dead), "the dead session container to exit", timeout=30.0)
            host.start()
            log = host.log
            assert f"a duplicate: GPU {taken} is already leased to session {sessions[1]}" in log, log
            assert "its worker is not running (exited)" in log and "no record of it; re-attaching" in log, log
            assert host.sessions().keys() == set(sessions)
            assert {twin, dead, mute}.isdisjoint(c.id for c in await host.containers())
            assert f"session {mute_id}: its worker did not come back" in log, log
            report = host.admin("GET", f"/api/sessions/{mute_id}")
            assert report["state"] == "failed" and report["end_reason"] == "worker_lost", report
            assert host.leases() == {**{g: s for s, g in gpus.items()}, 2: oneoff_task}

            async def ended() -> dict[str, Any] | None:
                status, task = await host.get(client, f"/api/tasks/{oneoff_task}")
                return task if status == 200 and task["status"] != "running" else None

            task = await wait_until(ended, "the adopted one-off to end", timeout=60.0)
            assert task["status"] == "completed" and task["text"] == "from-a-lost-gpud\n", task
            assert 2 not in host.leases()

            async def lost_removed() -> bool:
                return lost not in {c.id for c in await host.containers()}

            await wait_until(lost_removed, "the adopted one-off's container to be removed", timeout=10.0)
    finally:
        left = await close_restartable(host)
        assert not left, left


async def _exited(host: Restartable, container_id: str) -> bool:
    return (await host.engine.inspect(container_id)).state.value == "exited"
