"""Settings (one declaration each, loaded from defaults < YAML < environment < flags) and model presets."""

from gpud.settings.live import LiveConfig
from gpud.settings.load import load
from gpud.settings.schema import RELOADABLE, SPECS, Settings

__all__ = ["RELOADABLE", "SPECS", "LiveConfig", "Settings", "load"]
