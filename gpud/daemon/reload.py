"""Reload: re-read settings and presets (SIGHUP or POST /api/reload), apply what may change live, report the rest."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpud.daemon import logs
from gpud.daemon.services import Services
from gpud.daemon.systemd import Notifier
from gpud.errors import ConfigError
from gpud.settings import RELOADABLE, Settings
from gpud.settings import load as load_settings
from gpud.settings.presets import PresetCatalog, load_presets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRequest:
    """How settings were asked for at start, so a reload resolves them the same way."""

    config_file: Path | None
    flags: Mapping[str, Any]
    dev: bool
    environ: Mapping[str, str]

    def load(self) -> Settings:
        """Resolve settings again from every layer."""
        return load_settings(self.config_file, environ=self.environ, flags=self.flags, dev=self.dev)


class Reloader:
    """Applies a new configuration in place (SIGHUP or POST /api/reload) without dropping connections."""

    def __init__(self, request: LoadRequest, services: Services, notifier: Notifier) -> None:
        self._request = request
        self._services = services
        self._notifier = notifier
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        """Re-read settings and presets; apply what may change live, report what needs a restart."""
        async with self._lock:
            self._notifier.reloading()
            try:
                result = await asyncio.get_running_loop().run_in_executor(None, self._prepare)
            except ConfigError as exc:
                self._services.metrics.reloads.labels("failed").inc()
                logger.error("reload failed, keeping the running configuration:\n%s", exc)
                self._notifier.ready("reload failed; running with the previous configuration")
                return {"reloaded": False, "problems": exc.problems}
            settings, presets, changed = result
            self._apply(settings, presets, changed)
            return {"reloaded": True, **changed}

    def _prepare(self) -> tuple[Settings, PresetCatalog, dict[str, list[str]]]:
        running = self._services.config
        settings = self._request.load()
        presets = load_presets(settings.presets_file)
        fields = settings.changed_fields(running.settings)
        changed = {
            "applied": [name for name in fields if name in RELOADABLE],
            "needs_restart": [name for name in fields if name not in RELOADABLE],
            "presets_changed": _preset_changes(running.presets.all(), presets.all()),
        }
        return settings, presets, changed

    def _apply(self, settings: Settings, presets: PresetCatalog, changed: dict[str, list[str]]) -> None:
        services = self._services
        # Settings that need a restart keep their running values; only reloadable fields are taken.
        live = {name: getattr(settings, name) for name in changed["applied"]}
        services.config.replace(services.settings.with_values(live), presets)
        services.apply_settings(changed["applied"])
        logs.set_level(services.settings.log_level)
        services.metrics.reloads.labels("ok").inc()
        logger.info(
            "reloaded: settings changed %s; presets changed %s; needing a restart (not applied) %s",
            changed["applied"] or "none",
            changed["presets_changed"] or "none",
            changed["needs_restart"] or "none",
        )
        self._notifier.ready(status_line(services))


def _preset_changes(old: list[Any], new: list[Any]) -> list[str]:
    """Keys (model/preset) added, removed or modified."""
    before = {p.key: p for p in old}
    after = {p.key: p for p in new}
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def status_line(services: Services) -> str:
    """The one-line status systemd shows."""
    leased = len(services.scheduler.leases())
    return f"serving; {len(services.inventory.gpus)} GPU(s), {leased} leased"
