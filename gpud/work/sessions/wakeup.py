"""A session's wake-up signal: set by whoever changes what its life should do (a task queued, a cancel, a kill)."""

from __future__ import annotations

import asyncio


class Wakeup:
    """An asyncio.Event whose waits are plain futures.

    Waiting on an Event alongside other futures took a Task per wait (`ensure_future(event.wait())`), created and
    cancelled for every task a session runs, and a loop turn more before the waiter ran; `future()` is resolved
    by set() directly."""

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[bool]] = []

    def is_set(self) -> bool:
        """Whether set() was called since the last clear()."""
        return self._set

    def set(self) -> None:
        """Wake every waiter (and any later one, until clear())."""
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        """Forget an earlier set()."""
        self._set = False

    def future(self) -> asyncio.Future[bool]:
        """A future resolved at the next set() (at once if set now); the waiter may cancel it when done waiting."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._set:
            waiter.set_result(True)
        else:
            # Waiters that gave up (cancelled, e.g. after a deadline) are dropped here, so the list stays short.
            self._waiters = [w for w in self._waiters if not w.done()]
            self._waiters.append(waiter)
        return waiter
