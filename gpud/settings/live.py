"""The running configuration: settings and presets, replaced together on reload."""

from __future__ import annotations

from gpud.settings.presets import PresetCatalog
from gpud.settings.schema import Settings


class LiveConfig:
    """What the daemon runs with now. Services keep this object and read `settings`/`presets` at use, so a
    reload (which swaps both in one step) is seen everywhere at once, without a chain back to the daemon."""

    def __init__(self, settings: Settings, presets: PresetCatalog) -> None:
        self.settings = settings
        self.presets = presets

    def replace(self, settings: Settings, presets: PresetCatalog) -> None:
        """Swap in a reloaded configuration."""
        self.settings = settings
        self.presets = presets
