"""Idle-session eviction (GPUD_SESSION_EVICT_IDLE): when every GPU of a tier is held by idle sessions, new work for
the tier ends the least recently used one and runs on its GPU at once, instead of a 503 until the idle timeout.

Real services and real HTTP (tests/integration/stack.py): the first case on every runtime, the rest on the process
runtime (what is tested is gpud's choice, not the engine). The stack's GPUs are 0:low, 1:high unless said.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpud.errors import Unavailable
from gpud.gpu.scheduler import Lease
from gpud.settings.presets import load_presets
from gpud.work import capacity
from gpud.work.request import TaskType
from tests.fileservice import FileService
from tests.integration.stack import API_KEY, Stack, parse_sse, presets_yaml, runtimes, stack_fixture
from tests.waiting import wait_until

SHORT = {"max_tokens": 2, "delay": 0.01}
LONG = {"max_tokens": 40, "delay": 0.05}  # about 2 s: a session that is surely busy while the test looks
TWO_LOW = {"GPU_DEVICE_IDS": "0,1,2", "GPU_DEVICE_DIFFICULTY": "0:low,1:low,2:high"}


@pytest.fixture(params=runtimes())
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async for opened in stack_fixture(request.param):
        yield opened


@pytest.fixture
async def process_stack() -> AsyncIterator[Stack]:
    async for opened in stack_fixture("process"):
        yield opened


@pytest.fixture
async def two_low() -> AsyncIterator[Stack]:
    async for opened in stack_fixture("process", TWO_LOW):
        yield opened


@pytest.fixture
async def eviction_off() -> AsyncIterator[Stack]:
    async for opened in stack_fixture("process", {"GPUD_SESSION_EVICT_IDLE": "false"}):
        yield opened


def finish_of(events: list[Any]) -> dict[str, Any]:
    assert events[-1].event == "task_finish", [e.event for e in events]
    return events[-1].data


def connection_of(events: list[Any]) -> dict[str, Any]:
    return next(e.data for e in events if e.event == "connection")


async def open_session(stack: Stack, **fields: Any) -> tuple[str, int]:
    """Run a first task on a new session (left idle); its id and GPU."""
    events = await stack.run(stack.body("session", metadata=SHORT, **fields))
    assert finish_of(events)["status"] == "completed", finish_of(events)
    connection = connection_of(events)
    return connection["session_id"], connection["gpu_id"]


async def session(stack: Stack, session_id: str) -> dict[str, Any]:
    status, body = await stack.get(f"/api/sessions/{session_id}")
    assert status == 200, body
    return body


async def refused(stack: Stack, body: dict[str, Any]) -> tuple[int, str]:
    """Submit what must be refused before work starts: its status and error code."""
    async with await stack.submit(body) as response:
        assert response.status != 200, "expected a refusal, got a stream"
        return response.status, (await response.json())["error"]["code"]


async def assert_evicted(stack: Stack, session_id: str) -> None:
    """The session ended as evicted, and its id answers 410 session_evicted to tasks and keepalives."""
    ended = await session(stack, session_id)
    assert ended["state"] == "stopped" and ended["end_reason"] == "evicted", ended
    assert await refused(stack, stack.body("session", session_id=session_id)) == (410, "session_evicted")
    status, body = await stack.call("POST", f"/api/sessions/{session_id}/keepalive")
    assert status == 410 and body["error"]["code"] == "session_evicted"


async def evictions_counted(stack: Stack) -> float:
    async with stack.session.get(f"{stack.url}/metrics", headers={"X-API-Key": API_KEY}) as response:
        text = await response.text()
    line = next(line for line in text.splitlines() if line.startswith("gpud_sessions_evicted_total "))
    return float(line.split()[1])


async def test_new_work_for_a_tier_of_idle_sessions_evicts_one_and_runs_on_its_gpu(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpud.work.capacity")
    first, gpu = await open_session(stack)
    assert gpu == 0  # the only 'low' GPU, now held by an idle session
    # A second new session: formerly a 503 for up to SESSION_IDLE_TIMEOUT_SECONDS; now it runs on GPU 0.
    events = await stack.run(stack.body("session", metadata=SHORT))
    assert finish_of(events)["status"] == "completed"
    second = connection_of(events)
    assert second["gpu_id"] == 0 and second["session_id"] != first
    await assert_evicted(stack, first)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gpud.work.capacity"]
    assert first in line and stack.model_id in line and "GPU 0" in line, line
    # A one-off for the tier evicts the idle session the same way.
    events = await stack.run(stack.body("oneoff", metadata={"prompt": "hi"}))
    assert finish_of(events)["status"] == "completed"
    assert events[0].data["status"] == "gpu_allocated" and events[0].data["gpu_id"] == 0
    await assert_evicted(stack, second["session_id"])
    assert await evictions_counted(stack) == 2
    assert stack.services.scheduler.leases() == []
    await stack.all_removed()  # the one-off's container goes just after its task_finish


async def test_the_least_recently_used_idle_session_is_the_one_evicted(two_low: Stack) -> None:
    stack = two_low
    a, gpu_a = await open_session(stack)
    b, gpu_b = await open_session(stack)  # GPU 1 was free: nothing evicted
    assert (gpu_a, gpu_b) == (0, 1) and (await session(stack, a))["state"] == "ready"
    status, _ = await stack.call("POST", f"/api/sessions/{a}/keepalive")  # a is now used more recently than b
    assert status == 200
    c, gpu_c = await open_session(stack)
    assert gpu_c == gpu_b, "the new session runs on the GPU of the one evicted"
    await assert_evicted(stack, b)
    assert (await session(stack, a))["state"] == "ready"
    # Now a is the least recently used (c ran after a's keepalive): the next new work takes GPU 0.
    events = await stack.run(stack.body("oneoff", task_difficulty="low", metadata={"prompt": "x"}))
    assert finish_of(events)["status"] == "completed" and events[0].data["gpu_id"] == gpu_a
    await assert_evicted(stack, a)
    assert (await session(stack, c))["state"] == "ready"


async def test_a_busy_or_queued_session_is_never_evicted(process_stack: Stack) -> None:
    stack = process_stack
    high, _ = await open_session(stack, task_difficulty="high")  # idle, but of the other tier
    busy, _ = await open_session(stack)
    running = await stack.submit(stack.body("session", session_id=busy, metadata=LONG))
    await wait_until(lambda: state_is(stack, busy, "working"), "the session to be working")
    queued = await stack.submit(stack.body("session", session_id=busy, metadata=SHORT))
    await queued.content.readuntil(b"queue_position")
    for body in (stack.body("session", metadata=SHORT), stack.body("oneoff")):
        assert await refused(stack, body) == (503, "no_gpu_available")
    report = await session(stack, busy)
    assert report["state"] == "working" and report["queue_length"] == 1 and report["end_reason"] is None
    assert (await session(stack, high))["state"] == "ready", "low work never ends a session on a high GPU"
    for response in (running, queued):
        assert finish_of(parse_sse(await response.text()))["status"] == "completed"
    # Idle now (nothing running, nothing queued): new work may have its GPU.
    await wait_until(lambda: state_is(stack, busy, "ready"), "the session to be idle")
    assert connection_of(await stack.run(stack.body("oneoff")))["gpu_id"] == 0
    await assert_evicted(stack, busy)


async def state_is(stack: Stack, session_id: str, state: str) -> bool:
    return (await session(stack, session_id))["state"] == state


async def test_with_eviction_off_a_full_tier_is_503_as_before(eviction_off: Stack) -> None:
    stack = eviction_off
    idle, _ = await open_session(stack)
    for body in (stack.body("session", metadata=SHORT), stack.body("oneoff")):
        assert await refused(stack, body) == (503, "no_gpu_available")
    assert (await session(stack, idle))["state"] == "ready"
    assert await evictions_counted(stack) == 0


def holders_by_gpu(stack: Stack) -> dict[int, list[str]]:
    """Who runs on each GPU now: live sessions (not ended) and one-offs holding a GPU."""
    found: dict[int, list[str]] = defaultdict(list)
    for live in stack.services.sessions.registry.live():
        found[live.lease.gpu.index].append(f"session {live.id}")
    for task in stack.services.tasks.registry.active():
        if task.request.task_type is TaskType.ONEOFF and task.gpu_id is not None:
            found[task.gpu_id].append(f"one-off {task.id}")
    return found


class Watch:
    """Samples holders_by_gpu between event-loop steps while a race runs; any GPU with two holders is kept."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.samples = 0
        self.doubled: list[dict[int, list[str]]] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            holders = holders_by_gpu(self.stack)
            self.samples += 1
            if any(len(names) > 1 for names in holders.values()):
                self.doubled.append(dict(holders))
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def submit_all(stack: Stack, bodies: list[dict[str, Any]]) -> list[tuple[int, list[Any] | str]]:
    """Submit together; each answer's status with its whole stream (200) or its error code."""

    async def one(body: dict[str, Any]) -> tuple[int, list[Any] | str]:
        async with await stack.submit(body) as response:
            if response.status == 200:
                return 200, parse_sse(await response.text())
            return response.status, (await response.json())["error"]["code"]

    return list(await asyncio.gather(*(one(body) for body in bodies)))


async def test_submissions_racing_for_one_idle_session_evict_it_once(process_stack: Stack) -> None:
    stack = process_stack
    idle, _ = await open_session(stack)
    watch = Watch(stack)
    answers = await submit_all(
        stack,
        [stack.body("session", metadata=LONG), stack.body("session", metadata=LONG), stack.body("oneoff")],
    )
    await watch.stop()
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200, 503, 503], answers
    assert sorted(str(a) for s, a in answers if s == 503) == ["no_gpu_available"] * 2
    (events,) = [a for s, a in answers if s == 200]
    assert isinstance(events, list) and finish_of(events)["status"] == "completed"
    assert watch.samples > 10 and watch.doubled == [], watch.doubled
    await assert_evicted(stack, idle)
    assert await evictions_counted(stack) == 1


async def test_two_submissions_evict_two_different_sessions(two_low: Stack) -> None:
    stack = two_low
    idle = {(await open_session(stack))[0], (await open_session(stack))[0]}
    watch = Watch(stack)
    answers = await submit_all(stack, [stack.body("session", metadata=LONG), stack.body("oneoff")])
    await watch.stop()
    assert [status for status, _ in answers] == [200, 200], answers
    gpus = {connection_of(events)["gpu_id"] for _, events in answers if isinstance(events, list)}
    assert gpus == {0, 1} and watch.doubled == [], watch.doubled
    for session_id in idle:
        await assert_evicted(stack, session_id)
    assert await evictions_counted(stack) == 2


async def test_the_gpu_an_eviction_frees_goes_to_the_work_that_asked(
    process_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = process_stack
    idle, _ = await open_session(stack)
    scheduler = stack.services.scheduler
    release = scheduler.release
    intruders: list[str] = []

    def release_then_intrude(lease: Lease) -> None:
        """The moment the evicted session's GPU comes free, other work tries to take it."""
        release(lease)
        if lease.holder == idle:
            try:
                intruders.append(f"leased GPU {scheduler.acquire('low', 'intruder', 'task').gpu.index}")
            except Unavailable as exc:
                intruders.append(exc.code)

    monkeypatch.setattr(scheduler, "release", release_then_intrude)
    events = await stack.run(stack.body("session", metadata=SHORT))
    assert intruders == ["no_gpu_available"], "the freed GPU was kept for the work that evicted its session"
    assert finish_of(events)["status"] == "completed" and connection_of(events)["gpu_id"] == 0
    await assert_evicted(stack, idle)


async def test_a_one_off_that_fetches_its_model_evicts_only_once_the_model_is_there(
    svc: FileService, tmp_path: Path
) -> None:
    env = {"AUTO_FETCH_MODELS": "true", "FILE_SERVICE_URL": svc.url, "FILE_SERVICE_INTERNAL_KEY": svc.key or ""}
    async for stack in stack_fixture("process", env):
        idle, _ = await open_session(stack)  # its model is in the cache; GPU 0 is the only 'low' one
        # A second model, only on the file service, with a one-off preset (as a reload of the presets would add).
        other = f"{stack.model_id}-b"
        tree = tmp_path / "tree"
        tree.mkdir()
        (tree / "tokens.txt").write_text("alpha beta gamma\n")
        svc.add_tree(other, tree, tmp_path / "other.tar.gz", gzip=True)
        presets = Path(stack.env["GPUD_PRESETS_FILE"])
        more = presets_yaml(other, str(stack.base / "workers")).removeprefix("models:\n")
        presets.write_text(presets.read_text() + more)
        stack.services.config.replace(stack.services.settings, load_presets(presets))
        svc.set(other, chunk_delay=0.05, chunk_size=16)  # slow enough to look while it downloads
        body = {"task_type": "oneoff", "model_id": other, "task_preset": "oneoff", "metadata": {"max_tokens": 1}}
        async with await stack.submit(body) as response:
            assert response.status == 200, "a tier of idle sessions is no 503 for a one-off whose model is fetched"
            await response.content.readuntil(b"downloading")
            assert (await session(stack, idle))["state"] == "ready", "nothing is ended while the model downloads"
            events = parse_sse((await response.read()).decode())
        assert finish_of(events)["status"] == "completed", finish_of(events)
        allocated = [e.data for e in events if e.event == "connection" and e.data["status"] == "gpu_allocated"]
        assert [a["gpu_id"] for a in allocated] == [0]
        await assert_evicted(stack, idle)


async def test_an_eviction_that_does_not_finish_in_time_is_503_and_leaks_nothing(
    process_stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stack = process_stack
    caplog.set_level(logging.INFO, logger="gpud.work.capacity")
    idle, _ = await open_session(stack)
    # No time at all to end it: the new work stops waiting at once, as it would for a container that will not stop.
    monkeypatch.setattr(capacity, "EVICTION_WAIT_SECONDS", 0.0)
    assert await refused(stack, stack.body("session", metadata=SHORT)) == (503, "no_gpu_available")
    assert any("did not end within" in r.getMessage() and idle in r.getMessage() for r in caplog.records)
    # The session still ends (its stop was asked), and its GPU is anyone's again: nothing stays reserved.
    await wait_until(lambda: state_is(stack, idle, "stopped"), "the evicted session to end")
    await assert_evicted(stack, idle)
    assert stack.services.scheduler.leases() == []
    events = await stack.run(stack.body("oneoff"))
    assert finish_of(events)["status"] == "completed" and events[0].data["gpu_id"] == 0
