"""Admin-only routes (Unix socket): reload, GPU drain."""

from __future__ import annotations

from aiohttp import web

from gpud.api import keys
from gpud.api.health import gpu_report
from gpud.errors import InvalidRequest, Unavailable


def _gpu_index(request: web.Request) -> int:
    raw = request.match_info["gpu_id"]
    if not raw.isdigit():
        raise InvalidRequest(f"GPU id must be a whole number, got {raw!r}", code="invalid_gpu_id")
    return int(raw)


async def post_reload(request: web.Request) -> web.Response:
    """POST /api/reload: the same as SIGHUP; answers with what changed."""
    reload = request.app[keys.RELOAD]
    if reload is None:
        raise Unavailable("reload is not available in this process", code="reload_unavailable")
    return web.json_response(await reload())


async def post_drain(request: web.Request) -> web.Response:
    """POST /api/gpus/{gpu_id}/drain: no new leases; running work finishes."""
    index = _gpu_index(request)
    request.app[keys.SCHEDULER].drain(index)
    return _gpu_response(request.app, index)


async def post_undrain(request: web.Request) -> web.Response:
    """POST /api/gpus/{gpu_id}/undrain."""
    index = _gpu_index(request)
    request.app[keys.SCHEDULER].undrain(index)
    return _gpu_response(request.app, index)


def _gpu_response(app: web.Application, index: int) -> web.Response:
    inventory = app[keys.INVENTORY]
    gpu = inventory.get(index)
    assert gpu is not None  # the scheduler has just checked it exists
    return web.json_response(gpu_report(inventory, app[keys.SCHEDULER], gpu))


def add_admin_routes(app: web.Application) -> None:
    """Routes only the admin app serves."""
    app.router.add_post("/api/reload", post_reload)
    app.router.add_post("/api/gpus/{gpu_id}/drain", post_drain)
    app.router.add_post("/api/gpus/{gpu_id}/undrain", post_undrain)
