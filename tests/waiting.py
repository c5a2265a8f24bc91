"""Waiting for a condition in tests: one polling helper for plain code and one for asyncio.

Both call `check` until it returns something truthy and return that value. `what` names the condition; on time-out
an AssertionError (WaitTimeout) says what was awaited, for how long, and the last value `check` returned. An
exception raised by `check` is not swallowed: it ends the wait at once. The time-out bounds readiness, it is not a
speed assertion.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not become true in time."""


def _timed_out(what: str, timeout: float, last: object, note: str = "") -> WaitTimeout:
    return WaitTimeout(f"timed out after {timeout:g}s waiting for {what}; last value seen: {last!r}{note}")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 20.0, interval: float = 0.05) -> T:
    """Call check() every `interval` seconds until it returns a truthy value, and return it.

    check() runs at least once, also with a zero timeout. It may block itself (e.g. a socket read with a time-out);
    then pass interval=0.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)


async def wait_until(
    check: Callable[[], T | Awaitable[T | None] | None], what: str, timeout: float = 20.0, interval: float = 0.05
) -> T:
    """The asyncio form of wait_for: check may be a plain function or a coroutine function (or return an awaitable).

    An awaited check is bounded by the deadline too (but always gets min(timeout, 1 s)): one still running when
    time is up counts as not met.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value: Any = None
    while True:
        result = check()
        if inspect.isawaitable(result):
            try:
                async with asyncio.timeout_at(max(deadline, loop.time() + min(timeout, 1.0))) as scope:
                    result = await result
            except TimeoutError:
                if scope.expired():
                    raise _timed_out(what, timeout, value, " (and the last check was still running)") from None
                raise
        value = result
        if value:
            return value
        if loop.time() >= deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)
