"""Making sure an allowed image is present exactly once (which images are allowed: gpud.settings.images)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gpud.runtime.base import ProgressCallback

logger = logging.getLogger(__name__)

# Told the result of each pull (True: the image is there now), once per pull however many callers shared it.
PullObserver = Callable[[bool], None]


@dataclass
class _Flight:
    task: asyncio.Task[None]
    listeners: list[ProgressCallback] = field(default_factory=list)


class ImageEnsurer:
    """Single-flight "make this image present": concurrent callers for one image share one pull. An image found
    present is remembered, so later runs ask the engine nothing; the runtime forgets it when a create says the
    image is not there (removed since), and the next ensure looks again (and pulls)."""

    def __init__(
        self,
        present: Callable[[str], Awaitable[bool]],
        pull: Callable[[str, ProgressCallback], Awaitable[None]],
        on_pull: PullObserver | None = None,
    ) -> None:
        self._present = present
        self._pull = pull
        self._on_pull = on_pull
        self._flights: dict[str, _Flight] = {}
        self._present_images: set[str] = set()  # found present (allowed images only: a short list)

    async def ensure(self, image: str, progress: ProgressCallback | None = None) -> None:
        """Return once the image is present; raise what the shared pull raised."""
        if image in self._present_images:
            return
        flight = self._flights.get(image)
        if flight is None:
            if await self._present(image):
                self._present_images.add(image)
                return
            flight = self._flights.get(image)  # another caller may have started while we looked
        if flight is None:
            flight = _Flight(task=asyncio.get_running_loop().create_task(self._fetch(image)))
            self._flights[image] = flight
            flight.task.add_done_callback(lambda _t: self._flights.pop(image, None))
        if progress is not None:
            flight.listeners.append(progress)
        try:
            # shield: one caller giving up (cancelled) must not cancel the pull the others wait on.
            await asyncio.shield(flight.task)
        finally:
            if progress is not None and progress in flight.listeners:
                flight.listeners.remove(progress)

    def forget(self, image: str) -> bool:
        """The engine said the image is not there: look again next time. True when it was thought present."""
        if image not in self._present_images:
            return False
        self._present_images.discard(image)
        return True

    def in_flight(self) -> set[str]:
        """Images being pulled now."""
        return set(self._flights)

    async def _fetch(self, image: str) -> None:
        logger.info("pulling image %s", image)
        ok = False
        try:
            await self._pull(image, lambda message: self._broadcast(image, message))
            ok = True
            self._present_images.add(image)
        finally:
            if self._on_pull is not None:
                self._on_pull(ok)

    async def _broadcast(self, image: str, message: str) -> None:
        flight = self._flights.get(image)
        for listener in list(flight.listeners if flight else ()):
            try:
                result = listener(message)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a listener's failure must not fail the pull others share
                logger.exception("image progress listener failed for %s", image)
