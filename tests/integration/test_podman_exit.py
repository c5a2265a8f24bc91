"""Podman: a container's exit is learned as it happens (gpud/runtime/podexit.py), from a pidfd cue confirmed by
inspect, not from libpod's /wait (which returns only after conmon's cleanup, 60-125 ms later here): the exit code
right, the output whole, one wait per container shared with the log follower, and a later container's log file
found without an inspect. Where the process cannot be watched, /wait still gives the right status."""

from __future__ import annotations

import asyncio
import os
import select
import statistics
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gpud.runtime import podexit
from gpud.runtime.base import ExitStatus, LogLine, Stream
from gpud.runtime.podman import PodmanRuntime
from tests.integration.conftest import SpecMaker, engine_socket, remove_test_containers

SCRIPT = (
    "import sys, time\n"
    "time.sleep(0.2)\n"
    "for i in range(200):\n"
    "    print('line', i)\n"
    "sys.stdout.write('no newline at the end'); sys.stdout.flush()\n"
    "sys.exit(3)\n"
)
EXPECTED = "".join(f"line {i}\n" for i in range(200)) + "no newline at the end\n"


def stdout_of(lines: list[LogLine]) -> str:
    return "".join(line.line + ("" if line.partial else "\n") for line in lines if line.stream is Stream.STDOUT)


async def collect(lines: AsyncIterator[LogLine]) -> list[LogLine]:
    return [line async for line in lines]


def counting(calls: list[str], name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def counted(*args: Any) -> Any:
        calls.append(name)
        return await fn(*args)

    return counted


def exit_clock(pid: int) -> list[float]:
    """When the process `pid` (the container's, seen from here) ends: filled in by a thread watching a pidfd."""
    fd = os.pidfd_open(pid)
    when: list[float] = []

    def watch() -> None:
        select.select([fd], [], [])
        when.append(time.monotonic())
        os.close(fd)

    threading.Thread(target=watch, daemon=True).start()
    return when


async def test_the_exit_is_learned_as_it_happens_with_the_output_whole(run_id: str, model_dir: Path) -> None:
    runtime = PodmanRuntime(engine_socket("podman"))
    spec = SpecMaker(run_id, model_dir)
    calls: list[str] = []
    runtime._exits._api_wait = counting(calls, "wait", runtime._exits._api_wait)  # type: ignore[method-assign]
    runtime._inspect_raw = counting(calls, "inspect", runtime._inspect_raw)  # type: ignore[method-assign]
    lags = []
    try:
        first = await runtime.run(spec("python3", "-c", "print('first')"))
        assert stdout_of(await collect(runtime.logs(first))) == "first\n"  # this one's log path came from inspect
        for _ in range(3):
            container_id = await runtime.run(spec("python3", "-c", SCRIPT))
            state = await runtime._inspect_state(container_id)
            ended_at = exit_clock(int(state["Pid"]))
            calls.clear()
            follower = asyncio.create_task(collect(runtime.logs(container_id)))
            status = await runtime.wait(container_id)
            known_at = time.monotonic()
            lines = await follower
            assert status == ExitStatus(exit_code=3)
            assert stdout_of(lines) == EXPECTED, "whole at the exit: conmon wrote it before its exit file"
            # One wait for the task and the follower; no /wait; the log file found without an inspect.
            assert "wait" not in calls and calls.count("inspect") <= 4, calls
            assert runtime._log_paths[container_id] == str(
                (await runtime._inspect_raw(container_id))["HostConfig"]["LogConfig"]["Path"]
            )
            lags.append((known_at - ended_at[0]) * 1000)
            await runtime.remove(container_id)
        print(f"\nprocess end to exit known: median {statistics.median(lags):.1f} ms ({[round(x) for x in lags]})")
    finally:
        await remove_test_containers(runtime, run_id)
        await runtime.close()


async def test_a_process_that_cannot_be_watched_is_waited_for_through_libpod(
    run_id: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(podexit, "pidfd_of", lambda pid, conmon: None)  # as from another pid namespace
    runtime = PodmanRuntime(engine_socket("podman"))
    spec = SpecMaker(run_id, model_dir)
    calls: list[str] = []
    runtime._exits._api_wait = counting(calls, "wait", runtime._exits._api_wait)  # type: ignore[method-assign]
    try:
        container_id = await runtime.run(spec("python3", "-c", SCRIPT))
        lines, status = await asyncio.gather(collect(runtime.logs(container_id)), runtime.wait(container_id))
        assert status == ExitStatus(exit_code=3) and stdout_of(lines) == EXPECTED
        assert calls == ["wait"], "one /wait, shared by the follower"
    finally:
        await remove_test_containers(runtime, run_id)
        await runtime.close()
