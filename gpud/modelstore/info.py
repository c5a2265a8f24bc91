"""Plain data the model store hands out: fetch progress, model listings, verification results."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class FetchPhase(enum.Enum):
    """Where a fetch stands; every waiter sees the same sequence."""

    CONNECTING = "connecting"
    DOWNLOADING = "downloading"
    EXTRACTING = "extracting"
    DONE = "done"


@dataclass(frozen=True)
class FetchProgress:
    """One progress update for a model being fetched (bytes_total is None when the size is not announced)."""

    model_id: str
    phase: FetchPhase
    bytes_done: int
    bytes_total: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as used in `worker` events with status `fetching_model`."""
        return {
            "model_id": self.model_id,
            "phase": self.phase.value,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
        }


@dataclass(frozen=True)
class ModelInfo:
    """What the cache knows about one model."""

    model_id: str
    path: str
    complete: bool  # False while only a fetch in progress exists
    size_bytes: int | None
    last_used: float | None
    holders: tuple[str, ...] = ()
    has_manifest: bool = False
    fetching: FetchProgress | None = None

    @property
    def refcount(self) -> int:
        """How many running workers have the model mounted."""
        return len(self.holders)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the admin API."""
        return {
            "model_id": self.model_id,
            "path": self.path,
            "complete": self.complete,
            "size_bytes": self.size_bytes,
            "last_used": self.last_used,
            "in_use_by": list(self.holders),
            "refcount": self.refcount,
            "has_manifest": self.has_manifest,
            "fetching": self.fetching.to_dict() if self.fetching else None,
        }


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking a model directory against its manifest; ok is None when there is no manifest."""

    model_id: str
    ok: bool | None
    has_manifest: bool
    files_checked: int = 0
    problems: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the admin API."""
        return {
            "model_id": self.model_id,
            "ok": self.ok,
            "has_manifest": self.has_manifest,
            "files_checked": self.files_checked,
            "problems": list(self.problems),
        }
