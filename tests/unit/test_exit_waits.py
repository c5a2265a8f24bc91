"""Exit waits: one per container shared by every caller (gpud/runtime/exits.py), and Podman's exit learned from a
pidfd cue confirmed by inspect (gpud/runtime/podexit.py), with real processes standing in for containers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest

from gpud.runtime import podexit
from gpud.runtime.base import ContainerNotFound, EngineUnavailable, ExitStatus
from gpud.runtime.exits import SharedWaits
from gpud.runtime.podexit import PodmanExits, parent_of, pidfd_of
from tests.waiting import wait_until


async def test_concurrent_callers_share_one_wait_and_later_ones_need_none() -> None:
    waits, started, gate = SharedWaits(), [], asyncio.Event()

    async def start() -> ExitStatus:
        started.append(1)
        await gate.wait()
        return ExitStatus(exit_code=3)

    callers = [asyncio.create_task(waits.wait("c1", start)) for _ in range(3)]
    await wait_until(lambda: started, "the wait to start", timeout=5)
    callers[0].cancel()  # one caller giving up does not end the wait the others share
    gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and results[1:] == [ExitStatus(3), ExitStatus(3)]
    assert await waits.wait("c1", start) == ExitStatus(3) and len(started) == 1, "known: asked nothing again"
    waits.forget("c1")  # removed: a new wait would ask again
    assert await waits.wait("c1", start) == ExitStatus(3) and len(started) == 2


async def test_a_failed_wait_is_not_kept() -> None:
    waits, calls = SharedWaits(), []

    async def start() -> ExitStatus:
        calls.append(1)
        if len(calls) == 1:
            raise EngineUnavailable("away")
        return ExitStatus(exit_code=0)

    with pytest.raises(EngineUnavailable):
        await waits.wait("c1", start)
    assert await waits.wait("c1", start) == ExitStatus(0) and len(calls) == 2


def test_pidfd_only_for_the_named_parents_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert parent_of(child.pid) == os.getpid()
        fd = pidfd_of(child.pid, os.getpid())
        assert isinstance(fd, int) and fd >= 0
        os.close(fd)
        # Another parent (the pid is not conmon's child as seen from here: another pid namespace): not watched.
        assert pidfd_of(child.pid, os.getppid()) is None
        assert pidfd_of(0, os.getpid()) is None and pidfd_of(child.pid, 0) is None
    finally:
        child.kill()
        child.wait()
    assert pidfd_of(child.pid, os.getpid()) == podexit._GONE  # reaped: no such process


class FakeEngine:
    """Inspect states in order (the last repeats), and a /wait that records its use."""

    def __init__(self, states: list[dict[str, Any]]) -> None:
        self.states = states
        self.inspects = 0
        self.api_waits = 0

    async def inspect_state(self, container_id: str) -> dict[str, Any]:
        state = self.states[min(self.inspects, len(self.states) - 1)]
        self.inspects += 1
        if state.get("gone"):
            raise ContainerNotFound(f"no container {container_id}")
        return state

    async def api_wait(self, container_id: str) -> ExitStatus:
        self.api_waits += 1
        return ExitStatus(exit_code=9)


async def test_the_exit_is_taken_from_inspect_once_the_process_has_ended() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(0.3)")
    running = {"Status": "running", "Pid": proc.pid, "ConmonPid": os.getpid()}
    # Still `running` just after the process ended (conmon has not written its exit file yet), then `stopped`.
    engine = FakeEngine([running, running, {"Status": "stopped", "ExitCode": 4, "OOMKilled": True}])
    status = await PodmanExits(engine.inspect_state, engine.api_wait).wait("c1")
    assert await proc.wait() == 0
    assert status == ExitStatus(exit_code=4, oom_killed=True) and engine.api_waits == 0 and engine.inspects == 3


async def test_unwatchable_processes_fall_back_to_libpods_wait() -> None:
    # A pid that is not conmon's child as seen from here (e.g. gpud in another pid namespace): /wait, as before.
    engine = FakeEngine([{"Status": "running", "Pid": os.getpid(), "ConmonPid": 1}])
    assert await PodmanExits(engine.inspect_state, engine.api_wait).wait("c1") == ExitStatus(9)
    assert engine.api_waits == 1
    # Exited already: answered by the first inspect.
    engine = FakeEngine([{"Status": "exited", "ExitCode": 0}])
    assert await PodmanExits(engine.inspect_state, engine.api_wait).wait("c1") == ExitStatus(0)
    assert engine.api_waits == 0 and engine.inspects == 1


async def test_a_container_removed_while_waited_for_is_not_found() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    engine = FakeEngine([{"Status": "running", "Pid": proc.pid, "ConmonPid": os.getpid()}, {"gone": True}])
    with pytest.raises(ContainerNotFound):
        await PodmanExits(engine.inspect_state, engine.api_wait).wait("c1")
    await proc.wait()


async def test_a_process_that_ended_without_stopped_waits_on_libpod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podexit, "POLL_SECONDS", 0.05)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    engine = FakeEngine([{"Status": "running", "Pid": proc.pid, "ConmonPid": os.getpid()}])
    assert await PodmanExits(engine.inspect_state, engine.api_wait).wait("c1") == ExitStatus(9)
    assert engine.api_waits == 1
    await proc.wait()
