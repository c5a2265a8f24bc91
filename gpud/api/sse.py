"""Server-sent events for a task: replay from Last-Event-ID, then live, with a comment heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gpud.api import keys
from gpud.errors import InvalidRequest
from gpud.work.events import Event, Subscription, TaskEventLog

logger = logging.getLogger(__name__)

# One write() holds at most this many events, and past _WRITE_BYTES only the event that crossed the mark; a big
# event is written in slices of _WRITE_BYTES. A stalled client therefore pins one slice, not a backlog.
_BATCH = 512
_WRITE_BYTES = 256 * 1024
# How often an idle stream looks for a vanished client (the heartbeat write also notices, later).
_DISCONNECT_POLL = 1.0
# A client that takes no data for this long is dropped (GPUD_SSE_SEND_TIMEOUT_SECONDS overrides it).
DEFAULT_SEND_TIMEOUT = 30.0
_HEARTBEAT = b": ping\n\n"
_NO_LIBRARY_PING = 365 * 24 * 3600.0


def format_event(event: Event) -> bytes:
    """One SSE frame. JSON never holds a raw CR or LF, so one `data:` line is valid framing."""
    return b"".join(_frame_parts(event))


def _frame_parts(event: Event) -> tuple[bytes, bytes, bytes]:
    head = b"id: %d\nevent: %s\ndata: " % (event.id, event.type.value.encode())
    return head, event.json_bytes, b"\n\n"


def _chunks(batch: list[Event]) -> Iterator[bytes | memoryview]:
    """The frames of `batch` as writes of about _WRITE_BYTES: small frames joined, big ones sliced (no copy)."""
    pending: list[bytes] = []
    size = 0
    for event in batch:
        for part in _frame_parts(event):
            if size + len(part) <= _WRITE_BYTES:
                pending.append(part)
                size += len(part)
                continue
            if pending:
                yield b"".join(pending)
                pending, size = [], 0
            view = memoryview(part)
            for start in range(0, len(view), _WRITE_BYTES):
                piece = view[start : start + _WRITE_BYTES]
                if len(piece) == _WRITE_BYTES:
                    yield piece
                else:  # the tail joins the next frames
                    pending, size = [bytes(piece)], len(piece)
    if pending:
        yield b"".join(pending)


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


async def open_event_stream(
    request: web.Request, *, heartbeat: float, send_timeout: float = DEFAULT_SEND_TIMEOUT
) -> EventSourceResponse:
    """Send the SSE headers now (any method, e.g. POST submit), so the caller can stream before work starts."""
    # The library's own ping task would write between the slices of a big event and corrupt it: stream_task_events
    # sends the heartbeat itself, from the one coroutine that writes. send_timeout also sets TCP_USER_TIMEOUT: the
    # kernel drops a peer that acknowledges nothing for that long.
    response = EventSourceResponse(
        sep="\n", ping_interval=_NO_LIBRARY_PING, allow_all_methods=True, send_timeout=send_timeout
    )
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
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
) -> web.StreamResponse:
    """Stream `log` after `after_id` (default: from Last-Event-ID) until task_finish or client disconnect, with a
    comment heartbeat after `heartbeat` idle seconds.

    Every write must complete within `send_timeout`; a client that stops reading is dropped then (it may come
    back with Last-Event-ID), so a stalled reader holds one bounded write, never a growing backlog."""
    if after_id is None:
        after_id = last_event_id(request)
    if response is None:
        response = await open_event_stream(request, heartbeat=heartbeat, send_timeout=send_timeout)
    stream = _Stream(request, response, log, heartbeat, send_timeout)
    finished = False
    try:
        metrics = request.app.get(keys.METRICS)  # an app built for a test may have none
        with metrics.sse_clients.track_inprogress() if metrics is not None else contextlib.nullcontext():
            finished = await stream.pump(after_id)
    finally:
        response.stop_streaming()  # ends the library's (idle) ping task
    if finished:
        try:
            async with asyncio.timeout(send_timeout):
                await response.wait()
                await response.write_eof()
        except (ConnectionError, TimeoutError):
            stream.abort()
    return response


class _Stream:
    """One client's stream: the only writer of its response (events and heartbeat, never interleaved)."""

    def __init__(
        self,
        request: web.Request,
        response: EventSourceResponse,
        log: TaskEventLog,
        heartbeat: float,
        send_timeout: float,
    ) -> None:
        self.request = request
        self.response = response
        self.log = log
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()

    async def pump(self, after_id: int) -> bool:
        """Write events as they come; True when the log ended, False when the client went away or stalled."""
        with self.log.attach(after_id) as sub:
            while True:
                batch = sub.take(_BATCH, _WRITE_BYTES)
                if batch:
                    if not await self._write(_chunks(batch), batch[0].id - 1):
                        return False
                    continue
                if sub.exhausted:
                    return True
                state = await self._wait(sub)
                if state == "gone":
                    logger.debug("task %s: SSE client went away while idle", self.log.task_id)
                    return False
                if state == "idle" and not await self._write([_HEARTBEAT], sub.last_id):
                    return False

    async def _write(self, chunks: Iterable[bytes | memoryview], position: int) -> bool:
        """Write every chunk, each within the send timeout; False (and the connection dropped) otherwise."""
        try:
            for chunk in chunks:
                async with asyncio.timeout(self.send_timeout):
                    await self.response.write(chunk)
        except ConnectionError:
            logger.debug("task %s: SSE client went away after event %d", self.log.task_id, position)
            return False
        except TimeoutError:
            logger.info(
                "task %s: SSE client took no data for %gs; dropped after event %d (it may resume)",
                self.log.task_id,
                self.send_timeout,
                position,
            )
            self.abort()
            return False
        self._last_write = self._loop.time()
        return True

    async def _wait(self, sub: Subscription) -> str:
        """Wait for more events: "events" when they come, "idle" when a heartbeat is due, "gone" when the client's
        connection closed meanwhile (looked at every _DISCONNECT_POLL seconds)."""
        while True:
            left = self._last_write + self.heartbeat - self._loop.time()
            if left <= 0:
                return "idle"
            try:
                async with asyncio.timeout(min(_DISCONNECT_POLL, left)):
                    await sub.wait()
                return "events"
            except TimeoutError:
                transport = self.request.transport
                if transport is None or transport.is_closing():
                    return "gone"

    def abort(self) -> None:
        """Drop the connection without a graceful close (a stalled peer would never take the rest)."""
        if self.request.transport is not None:
            self.request.transport.abort()
