"""The manifest gpud writes next to a fetched model's files: what was stored, from where, with hashes."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpud.modelstore.archive import FileEntry

MANIFEST_NAME = ".gpud-manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class SourceInfo:
    """Where the payload came from and what it was."""

    url: str
    content_type: str
    payload_bytes: int
    payload_sha256: str
    sha256_checked: bool  # True when the file service sent a hash and it matched


@dataclass(frozen=True)
class Manifest:
    """Stored as MANIFEST_NAME in the model directory; written before the directory is renamed into place."""

    model_id: str
    fetched_at: float
    source: SourceInfo
    files: list[FileEntry] = field(default_factory=list)
    format: int = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of the regular files."""
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        """Serialise for disk."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse from disk; raises ValueError (or KeyError/TypeError) when malformed."""
        raw = json.loads(text)
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {raw.get('format')!r}")
        return cls(
            model_id=str(raw["model_id"]),
            fetched_at=float(raw["fetched_at"]),
            source=SourceInfo(**raw["source"]),
            files=[FileEntry(**f) for f in raw["files"]],
        )


def write_manifest(model_dir: Path, manifest: Manifest) -> None:
    """Write and fsync the manifest inside a (not yet published) model directory."""
    path = model_dir / MANIFEST_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, manifest.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(model_dir: Path) -> Manifest | None:
    """The manifest of a model directory, or None when it has none (placed by hand) or it is unreadable."""
    try:
        return Manifest.from_json((model_dir / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def now() -> float:
    """Wall-clock time for manifests and last-used stamps."""
    return time.time()
