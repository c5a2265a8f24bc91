"""Fleet mode in the web layer: a middleware that sends each request to the host that owns its session or task,
spills new work to a host with a free GPU when this one has none, and adds etcd's state to /health.

Installed only in fleet mode (gpud/api/app.py imports this module then), innermost, after authentication: a
forwarded request carries the client's own credentials (checked again by the owner) plus the fleet key, which
proves it comes from a fleet host and marks it as forwarded: it is served where it lands, never forwarded again.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from gpud.api import errors, keys
from gpud.api.routes.fleet import FLEET, add_fleet_routes
from gpud.errors import Gone, NotFound, Unavailable
from gpud.fleet.service import LOCAL, Fleet, Route

logger = logging.getLogger(__name__)

FLEET_KEY_HEADER = "X-Gpud-Fleet-Key"
FORWARDED_BY_HEADER = "X-Gpud-Forwarded-By"
MAX_FLEET_KEY_LENGTH = 512
# Headers that describe one connection, not the request (RFC 9110 7.6.1), and those aiohttp sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length", "date", "server",
    }
)  # fmt: skip
# A submission refused with one of these may run on another host.
SPILL_CODES = frozenset({"no_gpu_available", "no_gpu_for_difficulty"})
CONNECT_TIMEOUT_SECONDS = 3.0


def install_fleet(app: web.Application, fleet: Fleet, forwards: bool) -> None:
    """Put the fleet on an app: /api/fleet, /health's etcd state and (`forwards`: the public app) forwarding."""
    app[FLEET] = fleet
    app.middlewares.append(_middleware(fleet, forwards))
    add_fleet_routes(app)


def fleet_key_is_valid(given: str, key: str) -> bool:
    """Constant-time comparison of a presented fleet key."""
    if not given or len(given) > MAX_FLEET_KEY_LENGTH:
        return False
    try:
        raw = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(raw, key.encode("utf-8", "surrogateescape"))


def _middleware(fleet: Fleet, forwards: bool) -> Any:
    @web.middleware
    async def fleet_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get(FLEET_KEY_HEADER)
        if given is not None:
            if not fleet_key_is_valid(given, fleet.config.key):
                logger.warning("refused a forwarded request with a wrong fleet key from %s", request.remote)
                return errors.error_response(403, "fleet_key_invalid", f"wrong {FLEET_KEY_HEADER}")
            return await handler(request)  # forwarded here: served here (the loop guard)
        if request.path == "/health":
            return _with_fleet_health(await handler(request), fleet)
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
    """A request naming a session or task: here when this host has it, else at its owner, 410 if the owner is gone."""
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
    body = await _body(request)
    response = await forward(request, fleet, route, body)
    assert response is not None
    return response


async def _submit(request: web.Request, handler: Any, fleet: Fleet) -> web.StreamResponse:
    """POST /api/tasks/submit: to the session's owner; a new task here, else on a host with a free GPU."""
    body = await _body(request)
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


async def _body(request: web.Request) -> bytes:
    """The request body (cached by aiohttp: the handler reads the same bytes), within the body time-out."""
    limit = request.app[keys.CONFIG].settings.body_timeout_seconds
    try:
        async with asyncio.timeout(limit):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=f"the request body did not arrive within {limit:g} s") from None


async def forward(
    request: web.Request, fleet: Fleet, route: Route, body: bytes, try_next: bool = False
) -> web.StreamResponse | None:
    """Send the request to `route`'s host and relay its answer as it comes; with `try_next`, None when that host
    answers 503 or does not answer (the caller tries another)."""
    assert route.url is not None
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    headers[FLEET_KEY_HEADER] = fleet.config.key
    headers[FORWARDED_BY_HEADER] = fleet.host_id
    if request.remote:
        headers["X-Forwarded-For"] = request.remote
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECONDS)
    started = time.perf_counter()
    try:
        upstream = await fleet.http.request(
            request.method, route.url + request.path_qs, headers=headers, data=body or None, timeout=timeout
        )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        fleet.metrics.forwarded.labels("error").inc()
        logger.warning("fleet: host %s (%s) did not answer: %s", route.host, route.url, exc)
        if try_next:
            return None
        raise Unavailable(
            f"host {route.host}, which has this {request.path.split('/')[2][:-1]}, did not answer",
            code="fleet_host_unreachable",
            retry_after=1.0,
        ) from None
    fleet.metrics.forward_duration.observe(time.perf_counter() - started)
    try:
        if try_next and upstream.status == 503:
            fleet.metrics.forwarded.labels("unavailable").inc()
            return None
        fleet.metrics.forwarded.labels("ok").inc()
        return await _relay(request, upstream)
    finally:
        upstream.close()  # a no-op once the body was read whole; else ends the owner's stream with ours


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """The owner's answer: a JSON body whole; an event stream chunk by chunk, each written out as it arrives."""
    headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP]
    if upstream.content_type != "text/event-stream":
        data = await upstream.read()
        response = web.Response(body=data, status=upstream.status, reason=upstream.reason)
        response.headers.extend(headers)
        return response
    out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    out.headers.extend(headers)
    await out.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionError) as exc:
        # Our client left (the owner sees its stream end, as if the client had been attached there), or the
        # owner's stream broke (our client sees its stream end and may resume with Last-Event-ID).
        logger.debug("fleet: relayed stream of %s ended early: %s", request.path, exc)
    return out


def _with_fleet_health(response: web.StreamResponse, fleet: Fleet) -> web.StreamResponse:
    """/health with the fleet's state; degraded (503) with `etcd_unreachable` while etcd does not answer."""
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return response
    try:
        report = json.loads(response.body)
    except ValueError:
        return response
    reason = fleet.degraded()
    report["fleet"] = {"host_id": fleet.host_id, "hosts": len(fleet.view.hosts), "reason": reason}
    status = response.status
    if reason:
        report["status"] = "degraded"
        report.setdefault("reasons", []).append(reason)
        status = 503
    return web.json_response(report, status=status)
