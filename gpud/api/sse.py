"""Server-sent events for a task: replay from Last-Event-ID, then live, with a comment heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gpud.errors import InvalidRequest
from gpud.work.events import Event, Subscription, TaskEventLog

logger = logging.getLogger(__name__)

# Events written per write() call: one chunk, one syscall, one drain check for a whole backlog.
_BATCH = 512
# How often an idle stream looks for a vanished client (the heartbeat write also notices, later).
_DISCONNECT_POLL = 1.0


def format_event(event: Event) -> bytes:
    """One SSE frame, built once per event. JSON never holds a raw CR or LF, so one `data:` line is valid framing."""
    frame = event.frame_cache
    if frame is None:
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, event.type.value.encode(), event.json_bytes)
        event.frame_cache = frame
    return frame


def last_event_id(request: web.Request) -> int:
    """The id the client has already seen: the Last-Event-ID header, else ?last_event_id=, else 0."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or ""
    if not raw.strip():
        return 0
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidRequest(f"Last-Event-ID must be an event id, got {raw!r}", code="invalid_last_event_id") from None
    if value < 0:
        raise InvalidRequest("Last-Event-ID must not be negative", code="invalid_last_event_id")
    return value


async def open_event_stream(request: web.Request, *, heartbeat: float) -> EventSourceResponse:
    """Send the SSE headers now (any method, e.g. POST submit), so the caller can stream before work starts."""
    response = EventSourceResponse(sep="\n", ping_interval=heartbeat, allow_all_methods=True)
    # EventSourceResponse already sets these; repeated here because proxies buffering SSE is a real failure.
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    await response.prepare(request)
    return response


async def stream_task_events(
    request: web.Request,
    log: TaskEventLog,
    *,
    heartbeat: float,
    response: EventSourceResponse | None = None,
    after_id: int | None = None,
) -> web.StreamResponse:
    """Stream `log` after `after_id` (default: from Last-Event-ID) until task_finish or client disconnect."""
    if after_id is None:
        after_id = last_event_id(request)
    if response is None:
        response = await open_event_stream(request, heartbeat=heartbeat)
    finished = False
    try:
        finished = await _pump(request, response, log, after_id)
    finally:
        response.stop_streaming()  # ends the heartbeat task
    if finished:
        with contextlib.suppress(ConnectionError):
            await response.wait()
            await response.write_eof()
    return response


async def _pump(request: web.Request, response: EventSourceResponse, log: TaskEventLog, after_id: int) -> bool:
    """Write events as they come; True when the log ended, False when the client went away."""
    with log.attach(after_id) as sub:
        while True:
            batch = sub.take(_BATCH)
            if batch:
                try:
                    await response.write(b"".join([format_event(event) for event in batch]))
                except ConnectionError:
                    logger.debug("task %s: SSE client went away at event %d", log.task_id, sub.last_id)
                    return False
                continue
            if sub.exhausted:
                return True
            if not await _wait_or_gone(request, response, sub):
                logger.debug("task %s: SSE client went away while idle", log.task_id)
                return False


async def _wait_or_gone(request: web.Request, response: EventSourceResponse, sub: Subscription) -> bool:
    """Wait for more events; False if the client's connection closed meanwhile."""
    while True:
        try:
            async with asyncio.timeout(_DISCONNECT_POLL):
                await sub.wait()
            return True
        except TimeoutError:
            transport = request.transport
            if transport is None or transport.is_closing() or not response.is_connected():
                return False
