"""One model fetch shared by everyone waiting for it: progress to every waiter, and a fetch that ends (its
temporaries removed) when its last waiter leaves."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gpud.errors import Unavailable
from gpud.modelstore.info import FetchPhase, FetchProgress

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[FetchProgress], None]
T = TypeVar("T")
PROGRESS_INTERVAL = 0.2  # seconds between byte updates to waiters; phase changes are sent at once


@dataclass(eq=False)
class Flight:
    """One fetch in progress and everyone waiting on it."""

    model_id: str
    listeners: list[ProgressCallback] = field(default_factory=list)
    last: FetchProgress | None = None
    last_sent: float = 0.0
    task: asyncio.Task[None] | None = None
    waiters: int = 0
    # Set when the fetch is being cancelled: threads doing its work (extraction) stop at the next chunk.
    stop: threading.Event = field(default_factory=threading.Event)
    # Called when the last waiter leaves, before the fetch is cancelled (the store forgets the flight, so a
    # newcomer starts a fresh fetch instead of joining one that is ending).
    on_abandon: Callable[[Flight], None] | None = None

    def report(self, phase: FetchPhase, done: int, total: int | None, force: bool = False) -> None:
        """Tell every waiter; byte updates are spaced PROGRESS_INTERVAL apart so streams are not flooded."""
        update = FetchProgress(self.model_id, phase, done, total)
        changed = self.last is None or self.last.phase != phase
        self.last = update
        t = asyncio.get_running_loop().time()
        if force or changed or t - self.last_sent >= PROGRESS_INTERVAL or done == total:
            self.last_sent = t
            for cb in list(self.listeners):
                _call(cb, update)

    async def wait(self, progress: ProgressCallback | None) -> None:
        """Wait for the fetch to end (its error raised here). A waiter that is cancelled stops waiting at once;
        the last one to leave cancels the fetch and waits for its temporaries to be removed."""
        assert self.task is not None
        if progress is not None:
            self.listeners.append(progress)
            if self.last is not None:
                _call(progress, self.last)
        self.waiters += 1
        try:
            # shield: one waiter giving up must not cancel the download for the others.
            await asyncio.shield(self.task)
        except asyncio.CancelledError:
            self.waiters -= 1
            self._left_cancelled()
            await self._end_if_abandoned()
            raise
        else:
            self.waiters -= 1
        finally:
            if progress is not None:
                self.listeners.remove(progress)

    def _left_cancelled(self) -> None:
        """The fetch itself was cancelled (gpud is stopping) while this waiter was not: that is an error here."""
        assert self.task is not None
        current = asyncio.current_task()
        if self.task.cancelled() and (current is None or current.cancelling() == 0):
            raise Unavailable(
                f"fetching model {self.model_id!r} was stopped (gpud is shutting down)", code="model_fetch_failed"
            )

    async def _end_if_abandoned(self) -> None:
        assert self.task is not None
        if self.waiters > 0 or self.task.done():
            return
        logger.info("model %s: every waiter left; cancelling its fetch", self.model_id)
        if self.on_abandon is not None:
            self.on_abandon(self)
        self.stop.set()
        self.task.cancel()
        # Not shielded: a second cancel of this waiter stops waiting for the cleanup, which goes on regardless.
        await asyncio.wait({self.task})


async def in_thread(fn: Callable[..., T], *args: Any, stop: threading.Event | None = None) -> T:
    """Run fn in a worker thread. If cancelled meanwhile, set `stop` (fn is expected to watch it) and wait for
    the thread to end before re-raising, so that cleanup never races a thread still writing."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        await asyncio.wait({future})
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what matters now
        raise


def _call(callback: ProgressCallback, update: FetchProgress) -> None:
    try:
        callback(update)
    except Exception:
        logger.exception("model fetch progress callback failed")
