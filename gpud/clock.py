"""Time, injectable: the system clock in the daemon, a manual clock in tests of timers (idle, lifetime, timeouts).

`monotonic()` is for deadlines (never jumps), `time()` for timestamps people read. `wait()` is asyncio.wait
with a deadline on this clock, so code that sleeps until a deadline can be driven by a ManualClock in tests.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time as _time
from collections.abc import Iterable
from typing import Any, Protocol


class Clock(Protocol):
    """What time-keeping code depends on."""

    def time(self) -> float:
        """Seconds since the epoch (for records and reports)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for deadlines)."""

    async def wait(self, aws: Iterable[asyncio.Future[Any]], deadline: float | None) -> None:
        """Return when any of `aws` is done or monotonic() reaches `deadline` (None: no deadline)."""


class SystemClock:
    """The real clocks."""

    def time(self) -> float:
        """time.time()."""
        return _time.time()

    def monotonic(self) -> float:
        """time.monotonic()."""
        return _time.monotonic()

    async def wait(self, aws: Iterable[asyncio.Future[Any]], deadline: float | None) -> None:
        """asyncio.wait(FIRST_COMPLETED) with a timeout up to the deadline."""
        timeout = None if deadline is None else max(deadline - _time.monotonic(), 0.0)
        await asyncio.wait(set(aws), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)


class ManualClock:
    """A clock that moves only when a test calls advance(); waiters whose deadline passes wake then."""

    def __init__(self, start: float = 1_000_000.0, epoch: float = 1_700_000_000.0) -> None:
        self._now = start
        self._epoch_offset = epoch - start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        """Epoch seconds moving with the manual clock."""
        return self._now + self._epoch_offset

    def monotonic(self) -> float:
        """The manual reading."""
        return self._now

    async def wait(self, aws: Iterable[asyncio.Future[Any]], deadline: float | None) -> None:
        """Wait for any of `aws`, or for advance() to pass the deadline."""
        waiting = set(aws)
        if deadline is not None:
            if deadline <= self._now:
                return
            sleeper: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._sleepers, (deadline, next(self._order), sleeper))
            waiting.add(sleeper)
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if deadline is not None and not sleeper.done():
                sleeper.cancel()

    async def advance(self, seconds: float) -> None:
        """Move time forward, wake every waiter whose deadline has come, and let them run."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, sleeper = heapq.heappop(self._sleepers)
            if not sleeper.done():
                sleeper.set_result(None)
        for _ in range(20):  # a few loop turns so woken coroutines reach their next await
            await asyncio.sleep(0)


def wall_of(clock: Clock, monotonic: float) -> float:
    """The epoch time of a monotonic reading of `clock` (records keep monotonic stamps; reports show wall time)."""
    return clock.time() - (clock.monotonic() - monotonic)
