"""The one place that turns domain errors into HTTP: `{"error": {"code", "message"}}` with a status."""

from __future__ import annotations

import asyncio
import logging
import math

from aiohttp import web

from gpud.api import keys
from gpud.errors import ErrorKind, GpudError, InvalidRequest
from gpud.jsonsafe import UnsafeJSON, loads_strict

logger = logging.getLogger(__name__)

STATUS_BY_KIND = {
    ErrorKind.INVALID: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.GONE: 410,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.BUSY: 429,
    ErrorKind.INTERNAL: 500,
    ErrorKind.UNAVAILABLE: 503,
}

# Codes for aiohttp's own HTTP errors (routing, body size, methods), so every error body has the same shape.
CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, code: str, message: str, retry_after: float | None = None) -> web.Response:
    """A JSON error response; Retry-After (whole seconds) when the client should come back later."""
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def from_domain(exc: GpudError) -> web.Response:
    """The response for a domain error."""
    return error_response(STATUS_BY_KIND[exc.kind], exc.code, exc.message, exc.retry_after)


def from_http(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (404 route, 405, 413) in gpud's error shape."""
    code = CODE_BY_STATUS.get(exc.status, "http_error")
    message = {413: "request body is larger than the limit", 408: exc.text or ""}.get(exc.status) or exc.reason
    response = error_response(exc.status, code, message)
    if exc.status == 408:
        response.force_close()  # Connection: close: a body that came too slowly ends its connection
    if exc.status == 405 and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


async def read_body(request: web.Request) -> bytes:
    """The request body (cached by aiohttp: later reads get the same bytes).

    The whole body must arrive within GPUD_BODY_TIMEOUT_SECONDS (else 408 and the connection closes): a body sent
    a byte at a time would otherwise hold its connection, and the guard's deadlines do not run during a request.
    """
    if request.content.is_eof():  # the whole body came with the head (the usual small submission): no timer
        return await request.read()
    limit = request.app[keys.CONFIG].settings.body_timeout_seconds
    try:
        async with asyncio.timeout(limit):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=f"the request body did not arrive within {limit:g} s") from None


async def read_json_object(request: web.Request) -> dict[str, object]:
    """The request body (read_body) as a JSON object, or a 400 domain error saying what is wrong with it."""
    body = await read_body(request)
    try:
        # Strict: NaN/Infinity, out-of-range numbers, lone surrogates and nesting deeper than 64 are refused
        # here, so nothing unencodable (or recursive enough to blow the stack) reaches a task.
        data = loads_strict(body)
    except UnsafeJSON as exc:
        raise InvalidRequest(f"request body is not acceptable JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return data
