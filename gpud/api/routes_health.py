"""Health, metrics and GPU routes."""

from __future__ import annotations

from aiohttp import web

from gpud.api.keys import SERVICES
from gpud.health import gpu_report, health_report
from gpud.metrics import CONTENT_TYPE


async def get_health(request: web.Request) -> web.Response:
    """GET /health: 200 when ok, 503 when degraded (so load balancers and probes can act on the status)."""
    services = request.app[SERVICES]
    report = health_report(services, await services.runtime.health())
    return web.json_response(report, status=200 if report["status"] == "ok" else 503)


async def get_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus exposition from the daemon's own registry."""
    services = request.app[SERVICES]
    body = services.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def list_gpus(request: web.Request) -> web.Response:
    """GET /api/gpus."""
    services = request.app[SERVICES]
    return web.json_response({"gpus": [gpu_report(services, gpu) for gpu in services.inventory.gpus]})


def add_health_routes(app: web.Application) -> None:
    """Routes every app serves."""
    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/api/gpus", list_gpus)
