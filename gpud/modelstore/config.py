"""The model store's caps and pace, read from the settings (so the composition root passes them in one line)."""

from __future__ import annotations

from gpud.modelstore.archive import ArchiveLimits
from gpud.modelstore.pace import FetchPace
from gpud.settings import Settings


def archive_limits(settings: Settings) -> ArchiveLimits:
    """What a fetched archive may unpack to (GPUD_MODEL_ARCHIVE_*)."""
    return ArchiveLimits(
        max_bytes=settings.model_archive_max_bytes,
        max_ratio=settings.model_archive_max_ratio,
        max_entries=settings.model_archive_max_entries,
        max_depth=settings.model_archive_max_depth,
        max_path=settings.model_archive_max_path,
    )


def fetch_pace(settings: Settings) -> FetchPace:
    """How slow a download may be (GPUD_MODEL_FETCH_MIN_RATE, _RATE_WINDOW, _DEADLINE)."""
    return FetchPace(
        min_rate=settings.model_fetch_min_rate,
        window=settings.model_fetch_rate_window,
        deadline=settings.model_fetch_deadline,
    )
