"""Fleet mode in the web layer: a middleware that sends each request to the host that owns its session or task,
spills new work to a host with a free GPU when this one has none (the forwarding itself: gpud/api/fleet_forward.py).

Installed only in fleet mode (gpud/api/app.py imports this module then), innermost, after authentication: a
forwarded request carries the client's own credentials (checked again by the owner) plus the fleet key, which
proves it comes from a fleet host and marks it as forwarded: it is served where it lands, never forwarded again.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from aiohttp import web

from gpud.api import errors, keys
from gpud.api.fleet_forward import FLEET_KEY_HEADER, forward
from gpud.api.health import FLEET_HEALTH
from gpud.api.routes.fleet import FLEET, add_fleet_routes
from gpud.errors import Gone, NotFound, Unavailable
from gpud.fleet.service import LOCAL, Fleet, Route

logger = logging.getLogger(__name__)

MAX_FLEET_KEY_LENGTH = 512
# A submission refused with one of these may run on another host.
SPILL_CODES = frozenset({"no_gpu_available", "no_gpu_for_difficulty"})


def install_fleet(app: web.Application, fleet: Fleet, forwards: bool) -> None:
    """Put the fleet on an app: /api/fleet, /health's etcd state and (`forwards`: the public app) forwarding."""
    app[FLEET] = fleet
    app[FLEET_HEALTH] = fleet.health
    app.middlewares.append(_middleware(fleet, forwards))
    add_fleet_routes(app)


def fleet_key_is_valid(given: str, key: str | bytes) -> bool:
    """Constant-time comparison of a presented fleet key."""
    if not given or len(given) > MAX_FLEET_KEY_LENGTH:
        return False
    try:
        raw = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(raw, key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape"))


def _middleware(fleet: Fleet, forwards: bool) -> Any:
    key = fleet.config.key.encode("utf-8", "surrogateescape")

    @web.middleware
    async def fleet_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get(FLEET_KEY_HEADER)
        if given is not None:  # forwarded here: one header read and one comparison, nothing else
            if not fleet_key_is_valid(given, key):
                logger.warning("refused a forwarded request with a wrong fleet key from %s", request.remote)
                return errors.error_response(403, "fleet_key_invalid", f"wrong {FLEET_KEY_HEADER}")
            return await handler(request)  # forwarded here: served here (the loop guard)
        if not forwards:
            return await handler(request)
        match = request.match_info
        if "session_id" in match:
            return await _owned(request, handler, fleet, "sessions", match["session_id"])
        if "task_id" in match:
            return await _owned(request, handler, fleet, "tasks", match["task_id"])
        if request.method == "POST" and request.path == "/api/tasks/submit":
            return await _submit(request, handler, fleet)
        return await handler(request)

    return fleet_middleware


def _is_local(request: web.Request, kind: str, item: str) -> bool:
    registry: Any = request.app[keys.SESSIONS].registry if kind == "sessions" else request.app[keys.TASKS].registry
    try:
        registry.get(item)
    except NotFound:
        return False
    return True


async def _owned(request: web.Request, handler: Any, fleet: Fleet, kind: str, item: str) -> web.StreamResponse:
    """A request naming a session or task: here when this host has it, else at its owner, 410 if the owner is gone,
    this host's own 404 when no host has it (nor had it: its durable owner record is asked for, not waited for)."""
    route = fleet.route(kind, item)
    # A live claim by another host settles it without looking here (which may read the records database).
    if route.where != "remote" or fleet.view.owner(kind, item)[1] is False:
        if _is_local(request, kind, item):
            return await handler(request)
        route = await fleet.locate(kind, item)
    if route is LOCAL:
        return await handler(request)  # nobody has it: this host's own answer (404)
    if route.where == "lost":
        raise Gone(
            f"{kind[:-1]} {item} was on host {route.host}, which has left the fleet (its etcd lease expired)",
            code="host_lost",
        )
    body = await errors.read_body(request) if request.body_exists else b""
    response = await forward(request, fleet, route, body)
    assert response is not None
    return response


async def _submit(request: web.Request, handler: Any, fleet: Fleet) -> web.StreamResponse:
    """POST /api/tasks/submit: to the session's owner; a new task here, else on a host with a free GPU."""
    body = await errors.read_body(request)
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return await handler(request)  # the handler's own 400
    session_id = data.get("session_id")
    if isinstance(session_id, str) and session_id:
        return await _owned(request, handler, fleet, "sessions", session_id)
    tier = data.get("task_difficulty", "low")
    tier = tier if isinstance(tier, str) else "low"
    # A free GPU elsewhere comes before ending an idle session here (the local submission may evict one).
    if not _free_here(request, tier):
        response = await _spill(request, fleet, body, tier)
        if response is not None:
            return response
    try:
        return await handler(request)
    except Unavailable as exc:
        if exc.code not in SPILL_CODES:
            raise
        response = await _spill(request, fleet, body, tier)  # the view changed meanwhile
        if response is None:
            raise
        return response


def _free_here(request: web.Request, tier: str) -> bool:
    """Whether this host has a free GPU of `tier` now (or cannot say: then it answers itself)."""
    try:
        request.app[keys.SCHEDULER].check(tier)
    except Unavailable as exc:
        return exc.code not in SPILL_CODES
    return True


async def _spill(request: web.Request, fleet: Fleet, body: bytes, tier: str) -> web.StreamResponse | None:
    """The task sent to the first host with a free GPU of `tier` that takes it; None when none does."""
    for host in fleet.spill_targets(tier):
        response = await forward(request, fleet, Route("remote", host.host_id, host.url), body, try_next=True)
        if response is not None:
            return response
    return None
