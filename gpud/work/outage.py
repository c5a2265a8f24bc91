"""Riding out an engine outage: an engine whose API stops answering is not a container exit.

A container's exit is waited for, and its output followed, across such an outage: the calls are retried with
backoff while the engine does not answer and resume when it answers again. The wait then sees the exit that
happened meanwhile, if any; the output is read again from the container's start, and what was already delivered
is skipped per stream (by lines, and characters into a long line that came in pieces), so nothing is lost or
repeated. Each outage is logged when it starts and when it ends, not at every try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from gpud.runtime.base import (
    Capability,
    ContainerNotFound,
    ContainerRuntime,
    ContainerState,
    EngineUnavailable,
    ExitStatus,
    LogLine,
    Stream,
)

logger = logging.getLogger(__name__)

# After the exit, the output is read on as long as lines keep coming at most this far apart ...
DRAIN_IDLE_SECONDS = 5.0
# ... and waited for this long at most while the engine does not answer.
DRAIN_OUTAGE_SECONDS = 60.0
RETRY_FIRST_SECONDS = 0.25
RETRY_MOST_SECONDS = 1.0
# A follow that fails this many times in a row while the engine answers (a refusal, not an outage) gives up.
MOST_REFUSALS = 5


class Backoff:
    """Pauses between retries: doubling from RETRY_FIRST_SECONDS up to RETRY_MOST_SECONDS."""

    def __init__(self) -> None:
        self._next = RETRY_FIRST_SECONDS

    def reset(self) -> None:
        """The next pause is the shortest again (the call succeeded)."""
        self._next = RETRY_FIRST_SECONDS

    async def pause(self) -> None:
        """Sleep for the next pause."""
        await asyncio.sleep(self._next)
        self._next = min(self._next * 2, RETRY_MOST_SECONDS)


class Outage:
    """Whether the engine answers, as seen by one piece of work; logs each change once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None  # monotonic time the engine stopped answering; None while it answers

    @property
    def ongoing(self) -> bool:
        """True while the engine does not answer."""
        return self.since is not None

    def down(self, exc: BaseException) -> None:
        """A call failed because the engine did not answer."""
        if self.since is None:
            self.since = time.monotonic()
            logger.warning("%s: the container engine does not answer (%s); retrying until it does", self.what, exc)

    def up(self) -> None:
        """A call succeeded."""
        if self.since is not None:
            logger.info("%s: the container engine answers again after %.1fs", self.what, time.monotonic() - self.since)
            self.since = None

    async def ride_out(self, runtime: ContainerRuntime, backoff: Backoff) -> None:
        """Pause, then, while the engine is away, ask whether it answers (its health: cheap) until it does."""
        await backoff.pause()
        if self.since is None:
            return
        while not (await runtime.health()).ok:
            await backoff.pause()
        self.up()


async def wait_exit(runtime: ContainerRuntime, container_id: str, what: str) -> ExitStatus:
    """The container's exit status, however long the engine does not answer meanwhile. A container that is gone
    (or whose wait the engine refuses) counts as exited with code -1 and the reason."""
    outage, backoff = Outage(what), Backoff()
    while True:
        try:
            status = await runtime.wait(container_id)
        except EngineUnavailable as exc:
            outage.down(exc)
            await outage.ride_out(runtime, backoff)
            continue
        except Exception as exc:
            status = ExitStatus(exit_code=-1, error=str(exc))
        outage.up()
        return status


class OutputFollower:
    """A container's output from its start until it exits, every line once and in order per stream, however
    often the engine stops answering meanwhile. `whole` tells whether all of it was read: the end was reached,
    and the engine kept what the container wrote while it did not answer."""

    def __init__(self, runtime: ContainerRuntime, container_id: str, what: str) -> None:
        self._runtime = runtime
        self._container_id = container_id
        self.outage = Outage(what)
        self.complete = False
        self.lost_while_away = False  # output written while the engine was away may be lost (see _check_kept)
        self.read_at = time.monotonic()  # when a line was last read (delivered or skipped)
        # Per stream, how far output was delivered: (complete lines, characters into the line after them).
        self._delivered = {Stream.STDOUT: (0, 0), Stream.STDERR: (0, 0)}

    @property
    def whole(self) -> bool:
        """Whether the output was read to its end with nothing lost."""
        return self.complete and not self.lost_while_away

    def __aiter__(self) -> AsyncIterator[LogLine]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[LogLine]:
        backoff, refusals = Backoff(), 0
        while True:
            read = {Stream.STDOUT: (0, 0), Stream.STDERR: (0, 0)}  # where this pass is, per stream
            lines = self._runtime.logs(self._container_id, follow=True)
            try:
                async for line in lines:
                    self.read_at = time.monotonic()
                    new = self._admit(line, read)
                    if new is not None:
                        backoff.reset()
                        refusals = 0
                        yield new
                self.complete = True
                return
            except ContainerNotFound:
                logger.warning("%s: the container is gone; its output may be incomplete", self.outage.what)
                return
            except Exception as exc:  # the engine went away (before or while reading), or it refused
                if isinstance(exc, EngineUnavailable) or not (await self._runtime.health()).ok:
                    self.outage.down(exc)
                else:
                    refusals += 1
                    if refusals >= MOST_REFUSALS:
                        what = self.outage.what
                        logger.warning("%s: reading the output failed %d times (%s); giving up", what, refusals, exc)
                        return
            finally:
                await _close(lines)
            away = self.outage.ongoing
            await self.outage.ride_out(self._runtime, backoff)
            if away and Capability.OUTPUT_KEPT_WHILE_AWAY not in self._runtime.capabilities:
                await self._check_kept()

    async def _check_kept(self) -> None:
        """After an outage of an engine that keeps no output meanwhile: a container that did not outlast it may
        have written output (and exited) while nothing read it."""
        try:
            info = await self._runtime.inspect(self._container_id)
        except Exception:
            return  # gone, or the engine is away again: the next read finds out
        if info.state is not ContainerState.RUNNING:
            self.lost_while_away = True
            logger.warning(
                "%s: the container ended while the %s engine did not answer, and that engine keeps no output"
                " written meanwhile: its output may be incomplete",
                self.outage.what,
                self._runtime.name,
            )

    def _admit(self, line: LogLine, read: dict[Stream, tuple[int, int]]) -> LogLine | None:
        """The part of `line` (read at position `read`, which moves past it) not delivered before, if any."""
        stream = line.stream
        start = read[stream]
        end = (start[0], start[1] + len(line.line)) if line.partial else (start[0] + 1, 0)
        read[stream] = end
        done = self._delivered[stream]
        if end <= done:
            return None
        self._delivered[stream] = end
        if start < done:  # delivered in part (a long line whose pieces were cut elsewhere before)
            return LogLine(stream, line.line[done[1] - start[1] :], line.partial)
        return line


async def drain(pump: asyncio.Task[None], follower: OutputFollower) -> bool:
    """Wait for `pump` (consuming `follower`) to end after the container's exit; True when it did. An engine that
    never ends the stream, or stays away, must not hold the outcome hostage: the wait ends once no line was read
    for DRAIN_IDLE_SECONDS, or the engine has not answered for DRAIN_OUTAGE_SECONDS."""
    started = time.monotonic()
    while not pump.done():
        if follower.outage.since is not None:
            limit = follower.outage.since + DRAIN_OUTAGE_SECONDS
        else:
            limit = max(follower.read_at, started) + DRAIN_IDLE_SECONDS
        left = limit - time.monotonic()
        if left <= 0:
            return False
        await asyncio.wait({pump}, timeout=left)
    return not pump.cancelled() and pump.exception() is None


async def _close(lines: AsyncIterator[LogLine]) -> None:
    """Close a runtime's log iterator now (its stream, thread or file), not whenever it is collected."""
    close = getattr(lines, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
