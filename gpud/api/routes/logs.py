"""Admin route: a session worker container's logs, streamed as lines (plain text, or NDJSON with the stream name)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiohttp import web

from gpud.api import keys
from gpud.errors import Conflict, Gone, InvalidRequest
from gpud.runtime.base import ContainerNotFound, LogLine

logger = logging.getLogger(__name__)

# How often a quiet follow stream checks whether its client has gone (aiohttp does not cancel handlers).
_DISCONNECT_POLL = 1.0
_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"", "0", "false", "no"})


@dataclass(frozen=True)
class LogOptions:
    """What the client asked for: keep following, only the last N lines, and the line format."""

    follow: bool
    tail: int | None
    ndjson: bool


def parse_options(query: dict[str, str]) -> LogOptions:
    """follow=0|1, tail=N (N >= 0), format=text|ndjson; anything else is a 400 naming the parameter."""
    follow = query.get("follow", "").lower()
    if follow not in _TRUE | _FALSE:
        raise InvalidRequest(f"follow must be 0 or 1, got {follow!r}", code="invalid_follow")
    raw_tail = query.get("tail", "")
    if raw_tail and not raw_tail.isdigit():
        raise InvalidRequest(f"tail must be a whole number >= 0, got {raw_tail!r}", code="invalid_tail")
    fmt = query.get("format", "text")
    if fmt not in ("text", "ndjson"):
        raise InvalidRequest(f"format must be text or ndjson, got {fmt!r}", code="invalid_format")
    return LogOptions(follow=follow in _TRUE, tail=int(raw_tail) if raw_tail else None, ndjson=fmt == "ndjson")


def encode(lines: Iterable[LogLine], ndjson: bool) -> bytes:
    """Lines as one chunk: the bare line, or {"stream", "line"} per line (with "partial": true on each piece of an
    over-long line but its last; in text, such pieces are written without a newline, so the line stays whole)."""
    if ndjson:
        return b"".join(
            json.dumps(
                {"stream": ln.stream.value, "line": ln.line, **({"partial": True} if ln.partial else {})}
            ).encode()
            + b"\n"
            for ln in lines
        )
    return b"".join(ln.line.encode("utf-8", errors="replace") + (b"" if ln.partial else b"\n") for ln in lines)


async def session_logs(request: web.Request) -> web.StreamResponse:
    """GET /api/sessions/{session_id}/logs?follow=1&tail=N&format=ndjson: what the worker wrote, then (follow) more."""
    options = parse_options(dict(request.query))
    runtime = request.app[keys.RUNTIME]
    session = request.app[keys.SESSIONS].registry.get(request.match_info["session_id"])
    container_id = session.container_id
    if container_id is None:
        raise Conflict(
            f"session {session.id} has no worker container yet ({session.state.value})", code="session_no_container"
        )
    backlog = runtime.logs(container_id, follow=False)
    try:
        first = await anext(backlog, None)
    except ContainerNotFound:
        reason = session.end_reason or session.state.value
        raise Gone(f"session {session.id}: its worker container is gone ({reason})", code="session_logs_gone") from None
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.content_type = "application/x-ndjson" if options.ndjson else "text/plain"
    response.charset = "utf-8"
    await response.prepare(request)
    seen = await _write_backlog(response, first, backlog, options)
    if options.follow and seen is not None:
        live = runtime.logs(container_id, follow=True)
        await _follow(request, response, live, skip=seen, ndjson=options.ndjson)
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


async def _write_backlog(
    response: web.StreamResponse, first: LogLine | None, rest: AsyncIterator[LogLine], options: LogOptions
) -> int | None:
    """Write the lines so far (the last `tail` of them); return how many there were, or None if the client left."""
    kept: collections.deque[LogLine] = collections.deque(maxlen=options.tail)
    count = 0
    if first is not None:
        kept.append(first)
        count = 1
        async for line in rest:
            kept.append(line)
            count += 1
    try:
        if kept:
            await response.write(encode(kept, options.ndjson))
    except ConnectionError:
        return None
    return count


async def _follow(
    request: web.Request, response: web.StreamResponse, live: AsyncIterator[LogLine], *, skip: int, ndjson: bool
) -> None:
    """Write new lines until the worker's output ends or the client goes away (the first `skip` were sent)."""
    pending: asyncio.Future[LogLine] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(live))
            done, _ = await asyncio.wait({pending}, timeout=_DISCONNECT_POLL)
            if not done:
                transport = request.transport
                if transport is None or transport.is_closing():
                    return
                continue
            try:
                line = pending.result()
            except (StopAsyncIteration, ContainerNotFound):
                return
            pending = None
            if skip:
                skip -= 1  # already sent with the backlog
                continue
            await response.write(encode([line], ndjson))
    except ConnectionError:
        logger.debug("log client went away")
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        aclose = getattr(live, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def add_log_routes(app: web.Application) -> None:
    """Register the session-logs route (admin app only: worker output may carry secrets)."""
    app.router.add_get("/api/sessions/{session_id}/logs", session_logs)
