"""Middlewares: error shaping, API-key auth (public app), peer-credential auth (admin app), request metrics."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gpud.api import errors, keys
from gpud.api.peercred import PeerPolicy, peer_credentials
from gpud.errors import GpudError
from gpud.metrics import child

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Keys longer than this are refused before comparison, with the same 401 as any wrong key.
MAX_API_KEY_LENGTH = 512
# Paths the public app serves without a key.
OPEN_PATHS = frozenset({"/health"})
UNAUTHORIZED_MESSAGE = "missing or invalid API key (send X-API-Key: <key> or Authorization: Bearer <key>)"
# The route whose errors count as refused submissions.
SUBMIT_ROUTE = "/api/tasks/submit"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors and aiohttp's HTTP errors become JSON; anything else is a logged 500 with no traceback."""
    try:
        return await handler(request)
    except GpudError as exc:
        return errors.from_domain(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return errors.from_http(exc)
    except Exception:
        logger.exception("unexpected error handling %s %s", request.method, request.path)
        return errors.error_response(500, "internal_error", "internal error; see the gpud log")


def key_is_valid(candidate: str | None, keys: Iterable[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit reveals which matched)."""
    if not candidate or len(candidate) > MAX_API_KEY_LENGTH:
        return False
    try:
        # Header bytes that are not UTF-8 arrive as surrogate escapes: compare the bytes that were sent.
        given = candidate.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no header decoding produces: not a key
        return False
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode("utf-8", "surrogateescape"))
    return matched


def presented_key(request: web.Request) -> str | None:
    """The key a request carries: `X-API-Key: <key>`, else `Authorization: Bearer <key>` (what Prometheus and
    most HTTP clients can send). Any other Authorization scheme (Basic, ...) carries no key."""
    key = request.headers.get("X-API-Key")
    if key is not None:
        return key
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require an API key on the public app, except /health (and /metrics when configured public)."""
    settings = request.app[keys.CONFIG].settings
    open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_public else set())
    if request.path not in open_paths and not key_is_valid(presented_key(request), settings.internal_api_key):
        return errors.error_response(401, "unauthorized", UNAUTHORIZED_MESSAGE)
    return await handler(request)


def peer_middleware(policy: PeerPolicy) -> Middleware:
    """Admin app: only peers the policy admits (root, gpud's own user, members of the socket's group)."""

    @web.middleware
    async def check_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
        creds = peer_credentials(request)
        if creds is None or not policy.admits(creds):
            who = f"uid {creds.uid}" if creds else "an unknown peer"
            logger.warning("refused admin request from %s", who)
            return errors.error_response(
                403,
                "peer_not_allowed",
                f"{who} may not use the gpud admin socket (add the user to its group)",
            )
        return await handler(request)

    return check_peer


def metrics_middleware(app_name: str) -> Middleware:
    """Count requests and time them by route template (never raw paths: ids would explode label cardinality)."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        metrics = request.app[keys.METRICS]
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            info = request.match_info.route.resource
            route = info.canonical if info is not None else "unmatched"
            child(metrics.http_requests, app_name, route, str(status)).inc()
            child(metrics.http_latency, app_name, route).observe(time.perf_counter() - started)
            if route == SUBMIT_ROUTE and status >= 400:
                child(metrics.submissions_refused, str(status)).inc()

    return observe
