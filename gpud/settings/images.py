"""Which images may run: the ALLOWED_DOCKER_IMAGES allowlist, parsed and validated when settings load.

Allowlist entries are comma-separated glob patterns (``fnmatch``; ``*`` also crosses ``/`` and ``:``) matched
against the image reference as the preset writes it; a reference without a tag is matched as ``:latest``.
An entry may pin a digest (``name@sha256:<hex>``): it then allows only a reference naming that same digest,
so the engine itself verifies the content. An empty list allows nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gpud.errors import Forbidden

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ImageNotAllowed(Forbidden):
    """A preset names an image that ALLOWED_DOCKER_IMAGES does not allow."""

    code = "image_not_allowed"


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

    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: str | Iterable[str]) -> ImagePolicy:
        """Parse ALLOWED_DOCKER_IMAGES (a comma-separated string or a list); ValueError names a malformed pin."""
        items = value.split(",") if isinstance(value, str) else value
        patterns = tuple(p.strip() for p in items if p.strip())
        for pattern in patterns:
            _, digest = _split_digest(pattern)
            if digest is not None and not _DIGEST_RE.match(digest):
                raise ValueError(f"allowlist entry {pattern!r}: a pinned digest must be sha256:<64 hex digits>")
        return cls(patterns)

    def __str__(self) -> str:
        return ",".join(self.patterns)

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
