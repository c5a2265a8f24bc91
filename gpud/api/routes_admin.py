"""Admin-only routes (Unix socket): reload, GPU drain."""

from __future__ import annotations

from aiohttp import web

from gpud.api.keys import SERVICES
from gpud.errors import InvalidRequest, Unavailable
from gpud.health import gpu_report
from gpud.services import Services


def _gpu_index(request: web.Request) -> int:
    raw = request.match_info["gpu_id"]
    if not raw.isdigit():
        raise InvalidRequest(f"GPU id must be a whole number, got {raw!r}", code="invalid_gpu_id")
    return int(raw)


async def post_reload(request: web.Request) -> web.Response:
    """POST /api/reload: the same as SIGHUP; answers with what changed."""
    reloader = request.app[SERVICES].reloader
    if reloader is None:
        raise Unavailable("reload is not available in this process", code="reload_unavailable")
    return web.json_response(await reloader.reload())


async def post_drain(request: web.Request) -> web.Response:
    """POST /api/gpus/{gpu_id}/drain: no new leases; running work finishes."""
    services = request.app[SERVICES]
    index = _gpu_index(request)
    services.scheduler.drain(index)
    return _gpu_response(services, index)


async def post_undrain(request: web.Request) -> web.Response:
    """POST /api/gpus/{gpu_id}/undrain."""
    services = request.app[SERVICES]
    index = _gpu_index(request)
    services.scheduler.undrain(index)
    return _gpu_response(services, index)


def _gpu_response(services: Services, index: int) -> web.Response:
    gpu = services.inventory.get(index)
    assert gpu is not None  # the scheduler has just checked it exists
    return web.json_response(gpu_report(services, gpu))


def add_admin_routes(app: web.Application) -> None:
    """Routes only the admin app serves."""
    app.router.add_post("/api/reload", post_reload)
    app.router.add_post("/api/gpus/{gpu_id}/drain", post_drain)
    app.router.add_post("/api/gpus/{gpu_id}/undrain", post_undrain)
