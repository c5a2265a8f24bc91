"""One exit wait per container, shared by everyone who waits for it.

A one-off's container is waited for twice: by the task (gpud/work/outage.py `wait_exit`) and by its output
follower, which reads on until the exit is known (gpud/runtime/crilog.py, and Docker's second read of the finished
log). Each wait costs engine calls (an inspect, or a long-lived /wait plus an inspect), so the callers share one, and
the result is kept until the container is removed: a caller that asks after the exit is answered without a call.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

from gpud.runtime.base import ExitStatus

# Exit statuses kept for containers not removed through this runtime (another gpud's, a test's): the oldest go first.
MOST_KEPT = 1024

WaitFactory = Callable[[], Coroutine[Any, Any, ExitStatus]]


class SharedWaits:
    """Per container id: the wait in flight (shared, shielded from a caller giving up) or the status it found."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[ExitStatus]] = {}
        self._found: dict[str, ExitStatus] = {}

    async def wait(self, container_id: str, start: WaitFactory) -> ExitStatus:
        """The container's exit status: known already, from the wait in flight, or from a new one (`start`). A wait
        that fails (the engine did not answer, the container is gone) is not kept: the next caller starts another."""
        found = self._found.get(container_id)
        if found is not None:
            return found
        loop = asyncio.get_running_loop()
        task = self._running.get(container_id)
        if task is None or task.get_loop() is not loop:  # (a wait left in a closed loop, as in tests)
            task = loop.create_task(start(), name=f"exit-wait-{container_id[:12]}")
            self._running[container_id] = task
            task.add_done_callback(functools.partial(self._ended, container_id))
        # Shielded: one caller cancelled (its task ended otherwise) must not end the wait the others share.
        return await asyncio.shield(task)

    def _ended(self, container_id: str, task: asyncio.Task[ExitStatus]) -> None:
        if self._running.get(container_id) is task:
            del self._running[container_id]
        if task.cancelled() or task.exception() is not None:  # (retrieved: no "never retrieved" warning)
            return
        self._found[container_id] = task.result()
        while len(self._found) > MOST_KEPT:
            del self._found[next(iter(self._found))]

    def forget(self, container_id: str) -> None:
        """The container is removed: drop what is known of it."""
        self._found.pop(container_id, None)

    def cancel_all(self) -> None:
        """Stop every wait in flight (the runtime is closing)."""
        for task in list(self._running.values()):
            if not task.get_loop().is_closed():
                task.cancel()
        self._running.clear()
