"""The bundle of long-lived services the composition root (daemon.py) builds and both web apps share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpud.config import Settings
from gpud.gpus import GpuInventory
from gpud.metrics import Metrics
from gpud.presets import PresetCatalog
from gpud.scheduler import Scheduler

if TYPE_CHECKING:
    from gpud.daemon import Reloader


@dataclass
class Services:
    """Everything a request handler may use. `settings` and `presets` are replaced whole on reload."""

    settings: Settings
    presets: PresetCatalog
    inventory: GpuInventory
    scheduler: Scheduler
    metrics: Metrics
    reloader: Reloader | None = None
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)

    def uptime(self) -> float:
        """Seconds since the daemon started."""
        return time.monotonic() - self.started_monotonic
