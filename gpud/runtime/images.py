"""Which images may run (ALLOWED_DOCKER_IMAGES), and making sure an allowed image is present exactly once.

Allowlist entries are comma-separated glob patterns (``fnmatch``; ``*`` also crosses ``/`` and ``:``) matched
against the image reference as the preset writes it; a reference without a tag is matched as ``:latest``.
An entry may pin a digest (``name@sha256:<hex>``): it then allows only a reference naming that same digest,
so the engine itself verifies the content. An empty list allows nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from gpud.runtime.base import ImageNotAllowed, ProgressCallback

logger = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

__all__ = ["ImageEnsurer", "ImageNotAllowed", "ImagePolicy", "normalize_reference"]


def normalize_reference(image: str) -> str:
    """`name` -> `name:latest`; references with a tag or digest are returned unchanged."""
    image = image.strip()
    if "@" in image:
        return image
    last = image.rsplit("/", 1)[-1]
    return image if ":" in last else f"{image}:latest"


def _split_digest(ref: str) -> tuple[str, str | None]:
    name, sep, digest = ref.partition("@")
    return (name, digest) if sep else (ref, None)


@dataclass(frozen=True)
class ImagePolicy:
    """The image allowlist."""

    patterns: tuple[str, ...]

    @classmethod
    def parse(cls, value: str) -> ImagePolicy:
        """Parse ALLOWED_DOCKER_IMAGES; ValueError names a malformed digest pin."""
        patterns = tuple(p.strip() for p in value.split(",") if p.strip())
        for pattern in patterns:
            _, digest = _split_digest(pattern)
            if digest is not None and not _DIGEST_RE.match(digest):
                raise ValueError(f"allowlist entry {pattern!r}: a pinned digest must be sha256:<64 hex digits>")
        return cls(patterns)

    def allows(self, image: str) -> bool:
        """Whether some entry allows this image reference."""
        return any(self._matches(pattern, image) for pattern in self.patterns)

    def check(self, image: str) -> None:
        """Raise ImageNotAllowed unless allowed; call before any container is created."""
        if not self.allows(image):
            allowed = ", ".join(self.patterns) or "(nothing: ALLOWED_DOCKER_IMAGES is empty)"
            raise ImageNotAllowed(f"image {image!r} is not allowed; ALLOWED_DOCKER_IMAGES allows: {allowed}")

    @staticmethod
    def _matches(pattern: str, image: str) -> bool:
        pat_name, pat_digest = _split_digest(pattern)
        img_name, img_digest = _split_digest(image.strip())
        if pat_digest is not None:
            # A pinned entry allows only the same content: the reference must carry the same digest.
            return img_digest == pat_digest and _name_matches(pat_name, img_name)
        if img_digest is not None:
            return _name_matches(pat_name, img_name)
        return fnmatchcase(normalize_reference(img_name), pat_name) or fnmatchcase(img_name, pat_name)


def _name_matches(pattern: str, name: str) -> bool:
    """Match a digest reference's name part, with or without a tag in the pattern."""
    bare = pattern.rsplit(":", 1)[0] if ":" in pattern.rsplit("/", 1)[-1] else pattern
    return fnmatchcase(name, pattern) or fnmatchcase(name, bare)


@dataclass
class _Flight:
    task: asyncio.Task[None]
    listeners: list[ProgressCallback] = field(default_factory=list)


class ImageEnsurer:
    """Single-flight "make this image present": concurrent callers for one image share one pull."""

    def __init__(
        self,
        present: Callable[[str], Awaitable[bool]],
        pull: Callable[[str, ProgressCallback], Awaitable[None]],
    ) -> None:
        self._present = present
        self._pull = pull
        self._flights: dict[str, _Flight] = {}

    async def ensure(self, image: str, progress: ProgressCallback | None = None) -> None:
        """Return once the image is present; raise what the shared pull raised."""
        flight = self._flights.get(image)
        if flight is None:
            if await self._present(image):
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

    def in_flight(self) -> set[str]:
        """Images being pulled now."""
        return set(self._flights)

    async def _fetch(self, image: str) -> None:
        logger.info("pulling image %s", image)
        await self._pull(image, lambda message: self._broadcast(image, message))

    async def _broadcast(self, image: str, message: str) -> None:
        flight = self._flights.get(image)
        for listener in list(flight.listeners if flight else ()):
            try:
                result = listener(message)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a listener's failure must not fail the pull others share
                logger.exception("image progress listener failed for %s", image)
