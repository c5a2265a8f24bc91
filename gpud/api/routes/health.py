"""Health, metrics and GPU routes."""

from __future__ import annotations

from aiohttp import web

from gpud.api import keys
from gpud.api.health import gpu_reports, health_report
from gpud.metrics import CONTENT_TYPE


async def get_health(request: web.Request) -> web.Response:
    """GET /health: 200 when ok, 503 when degraded (so load balancers and probes can act on the status)."""
    report = health_report(request.app, await request.app[keys.RUNTIME].health())
    return web.json_response(report, status=200 if report["status"] == "ok" else 503)


async def get_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus exposition from the daemon's own registry."""
    body = request.app[keys.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def list_gpus(request: web.Request) -> web.Response:
    """GET /api/gpus."""
    return web.json_response({"gpus": gpu_reports(request.app)})


def add_health_routes(app: web.Application) -> None:
    """Routes every app serves."""
    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/api/gpus", list_gpus)
