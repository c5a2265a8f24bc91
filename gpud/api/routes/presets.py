"""Preset listing: which models and presets this host can run."""

from __future__ import annotations

from aiohttp import web

from gpud.api import keys
from gpud.settings.presets import Preset


def preset_report(preset: Preset) -> dict[str, object]:
    """One preset as JSON (environment values are left out: they may carry configuration secrets)."""
    limits = preset.limits
    return {
        "model_id": preset.model_id,
        "preset": preset.name,
        "image": preset.image,
        "command": list(preset.command),
        "env_keys": sorted(preset.env),
        "mode": preset.mode,
        "readiness_timeout_seconds": preset.readiness_timeout_seconds,
        "user": preset.user,
        "limits": {
            "memory_bytes": limits.memory_bytes,
            "cpus": limits.cpus,
            "pids": limits.pids,
            "shm_bytes": limits.shm_bytes,
            "tmpfs_bytes": limits.tmpfs_bytes,
        },
    }


async def list_presets(request: web.Request) -> web.Response:
    """GET /api/presets."""
    catalog = request.app[keys.CONFIG].presets
    return web.json_response({"source": catalog.source, "presets": [preset_report(p) for p in catalog.all()]})


def add_preset_routes(app: web.Application) -> None:
    """Preset routes (both apps)."""
    app.router.add_get("/api/presets", list_presets)
