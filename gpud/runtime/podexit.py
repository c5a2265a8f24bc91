"""A Podman container's exit, learned when it happens rather than after conmon's cleanup.

libpod's `/wait` returns only once the container is `exited`, i.e. after conmon's exit command (`podman container
cleanup`, a new podman process) has run: 60-125 ms after the container died on the 2-core test machine, up to
280 ms when nothing else looks at the container (docs/performance.md). Its event stream is no quicker: libpod
emits `died` only when something syncs the container's state, and its file-backed stream is read every 250 ms.

So the kernel says when: a pidfd on the container's init process (inspect's `State.Pid`) becomes readable when it
has exited (with a private pid namespace, every other process in the container is gone by then too). That is only
the cue: the exit itself is taken from inspect, which makes libpod read conmon's exit file, so it says `stopped`
with the exit code and OOMKilled once conmon has written that file, which conmon does after draining the output
into the log file and checking for an OOM kill. Until inspect says so the container counts as running (its GPU
stays leased). Where the process cannot be watched from here (another pid namespace: a remote engine, gpud in a
container; no pidfd support; a pid that is not conmon's child) libpod's `/wait` is used as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from gpud.runtime.base import ContainerState, ExitStatus
from gpud.runtime.podspec import exit_status

logger = logging.getLogger(__name__)

# After the process has ended, inspect is asked this long later (conmon drains the output, syncs the log and writes
# its exit file meanwhile: one inspect mostly suffices then), then at growing pauses up to POLL_MOST ...
POLL_FIRST = 0.002
POLL_MOST = 0.2
# ... and after this long without `stopped` (a conmon that does not write its exit file), /wait is asked instead.
POLL_SECONDS = 2.0
_GONE = -1  # pidfd_of: no such process (ended already, or the pid is another namespace's)

InspectState = Callable[[str], Awaitable[Mapping[str, Any]]]
ApiWait = Callable[[str], Awaitable[ExitStatus]]


def ended(state: Mapping[str, Any]) -> bool:
    """Whether an inspect `State` says the container has exited (`stopped` before conmon's cleanup, `exited` after)."""
    return ContainerState.parse(str(state.get("Status", ""))) is ContainerState.EXITED


def parent_of(pid: int) -> int | None:
    """The parent pid of a process in this pid namespace, from /proc; None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
        # The command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
        return int(stat.rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def pidfd_of(pid: int, conmon: int) -> int | None:
    """A pidfd for the container's process `pid` if it is the child of its conmon `conmon` as seen from here (so this
    is the engine's pid namespace, and the pid is the container's); _GONE when there is no such process; None when
    it cannot be watched from here."""
    if pid <= 0 or conmon <= 0 or not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return _GONE
    except OSError:  # not permitted here (a sandbox), or the kernel has no pidfd
        return None
    # Read after the pidfd is open: a parent that matches now means the pidfd is the container's process (a pid is
    # not reused while the process is a zombie, and conmon starts no other child before it has reaped this one).
    if parent_of(pid) != conmon:
        os.close(fd)
        return None
    return fd


async def until_readable(fd: int) -> None:
    """Return once `fd` (a pidfd: its process has exited) is readable."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class PodmanExits:
    """Waits for a container's exit with a pidfd cue and inspect, falling back to libpod's `/wait`."""

    def __init__(self, inspect_state: InspectState, api_wait: ApiWait) -> None:
        self._inspect_state = inspect_state  # the container's inspect `State` (raises ContainerNotFound ...)
        self._api_wait = api_wait  # libpod's /wait, then the status from inspect

    async def wait(self, container_id: str) -> ExitStatus:
        """The container's exit status once the engine says it has exited."""
        state = await self._inspect_state(container_id)
        if ended(state):
            return exit_status(state)
        fd = pidfd_of(int(state.get("Pid") or 0), int(state.get("ConmonPid") or 0))
        if fd is None:
            return await self._api_wait(container_id)
        if fd != _GONE:
            try:
                await until_readable(fd)
            finally:
                os.close(fd)
        return await self._settled(container_id)

    async def _settled(self, container_id: str) -> ExitStatus:
        """The status once inspect says `stopped`, asked at growing pauses; /wait after POLL_SECONDS."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POLL_SECONDS
        pause = POLL_FIRST
        while True:
            await asyncio.sleep(pause)
            state = await self._inspect_state(container_id)
            if ended(state):
                return exit_status(state)
            if loop.time() >= deadline:
                logger.debug("container %s: still running after its process ended; waiting on libpod", container_id)
                return await self._api_wait(container_id)
            pause = min(pause * 2.5, POLL_MOST)
