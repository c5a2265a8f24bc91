"""Containers gpud could not remove yet (the engine did not answer): kept on a list and removed again later.

What depends on a container being gone (its GPU lease, its worker uid) is released only once it is, by the
callback given with it: a worker that may still run keeps its GPU, so the GPU is never leased twice. The task
service's janitor retries the list; nothing leaks while the engine is away, and nothing waits for it to return.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from gpud.runtime.base import ContainerRuntime

logger = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.5
RETRY_MOST_SECONDS = 2.0


@dataclass
class _Pending:
    what: str
    on_gone: Callable[[], None]
    since: float
    next_try: float
    pause: float = RETRY_FIRST_SECONDS
    tries: int = 1


class PendingRemovals:
    """Removes containers, keeping those the engine would not remove for another try."""

    def __init__(self, runtime: ContainerRuntime) -> None:
        self._runtime = runtime
        self._pending: dict[str, _Pending] = {}

    @property
    def pending(self) -> list[str]:
        """Ids of containers still to be removed."""
        return list(self._pending)

    async def remove(self, container_id: str, what: str, on_gone: Callable[[], None] | None = None) -> bool:
        """Remove the container now; True when it is gone (`on_gone` has then run). Otherwise it is kept for
        another try, and `on_gone` runs once a later try removes it."""
        try:
            # Shielded: a cancelled caller (shutdown) must not leave the removal half done.
            await asyncio.shield(self._runtime.remove(container_id))
        except Exception as exc:
            logger.warning(
                "%s: container %s could not be removed (%s); trying again until it is", what, container_id, exc
            )
            self.hold(container_id, what, on_gone or _nothing)
            return False
        _run(on_gone or _nothing, what)
        return True

    def hold(self, container_id: str, what: str, on_gone: Callable[[], None]) -> None:
        """Keep a container that could not be removed just now for the next tries; `on_gone` runs once it is."""
        now = time.monotonic()
        self._pending[container_id] = _Pending(what, on_gone, now, now + RETRY_FIRST_SECONDS)

    def hold_all(self, container_ids: Collection[str], what: str, on_gone: Callable[[], None]) -> None:
        """Keep containers that could not be removed just now for the next tries; `on_gone` runs once all of them
        are gone (at once when there are none)."""
        left = set(container_ids)
        if not left:
            _run(on_gone, what)

        def one_gone(container_id: str) -> None:
            left.discard(container_id)
            if not left:
                on_gone()

        for container_id in list(left):
            self.hold(container_id, what, functools.partial(one_gone, container_id))

    async def retry(self, every: bool = False) -> int:
        """Try again each container whose pause is over (or `every` one); returns how many are still pending."""
        now = time.monotonic()
        for container_id, entry in list(self._pending.items()):
            if not every and now < entry.next_try:
                continue
            try:
                await asyncio.shield(self._runtime.remove(container_id))
            except Exception as exc:
                entry.tries += 1
                entry.pause = min(entry.pause * 2, RETRY_MOST_SECONDS)
                entry.next_try = time.monotonic() + entry.pause
                logger.debug("%s: container %s still not removed (%s)", entry.what, container_id, exc)
                continue
            del self._pending[container_id]
            logger.info(
                "%s: container %s removed after %d tries (%.1fs)",
                entry.what,
                container_id,
                entry.tries + 1,
                time.monotonic() - entry.since,
            )
            _run(entry.on_gone, entry.what)
        return len(self._pending)


def _nothing() -> None:
    pass


def _run(callback: Callable[[], None], what: str) -> None:
    try:
        callback()
    except Exception:
        logger.exception("%s: releasing what its container held failed", what)
