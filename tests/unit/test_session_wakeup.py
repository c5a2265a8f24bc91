"""A session's Wakeup: an asyncio.Event whose waits are plain futures (no Task per wait)."""

from __future__ import annotations

import asyncio

from gpud.work.sessions.wakeup import Wakeup


async def test_a_set_wakes_the_waiter_and_is_remembered_until_cleared() -> None:
    wake = Wakeup()
    waiter = wake.future()
    assert not waiter.done()
    wake.set()
    assert await asyncio.wait_for(waiter, 1) is True
    assert wake.future().done(), "set before the wait: resolved at once"
    wake.clear()
    assert not wake.is_set() and not wake.future().done()


async def test_waiters_that_gave_up_are_not_kept() -> None:
    wake = Wakeup()
    for _ in range(1000):  # a supervisor's wait ended by its deadline, over and over, with no set()
        wake.future().cancel()
    assert len(wake._waiters) <= 1
    waiter = wake.future()
    wake.set()
    assert waiter.result() is True
