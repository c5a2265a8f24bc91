"""Session routes: list, show, kill, keepalive."""

from __future__ import annotations

from aiohttp import web

from gpud.api import keys
from gpud.work.sessions.record import Session


def _session(request: web.Request) -> Session:
    return request.app[keys.SESSIONS].registry.get(request.match_info["session_id"])


async def list_sessions(request: web.Request) -> web.Response:
    """GET /api/sessions: live sessions and recently ended ones."""
    sessions = request.app[keys.SESSIONS].registry.all()
    return web.json_response({"sessions": [session.report() for session in sessions]})


async def get_session(request: web.Request) -> web.Response:
    """GET /api/sessions/{session_id}."""
    return web.json_response(_session(request).report())


async def kill_session(request: web.Request) -> web.Response:
    """DELETE /api/sessions/{session_id}: running and queued tasks finish as cancelled; the worker is removed."""
    session = _session(request)
    await request.app[keys.SESSIONS].kill(session)
    return web.json_response(session.report())


async def keepalive(request: web.Request) -> web.Response:
    """POST /api/sessions/{session_id}/keepalive: reset the idle timer."""
    session = _session(request)
    request.app[keys.SESSIONS].keepalive(session)
    return web.json_response(session.report())


def add_session_routes(app: web.Application) -> None:
    """Session routes (both apps)."""
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_get("/api/sessions/{session_id}", get_session)
    app.router.add_delete("/api/sessions/{session_id}", kill_session)
    app.router.add_post("/api/sessions/{session_id}/keepalive", keepalive)
