"""GET /api/fleet (fleet mode only): the hosts this host sees, their GPUs per tier, sessions, health, last seen."""

from __future__ import annotations

from aiohttp import web

from gpud.fleet.service import Fleet

FLEET: web.AppKey[Fleet] = web.AppKey("fleet", Fleet)


async def get_fleet(request: web.Request) -> web.Response:
    """GET /api/fleet."""
    return web.json_response(request.app[FLEET].report())


def add_fleet_routes(app: web.Application) -> None:
    """The fleet route (both apps, in fleet mode)."""
    app.router.add_get("/api/fleet", get_fleet)
