"""Server-sent events for a task: replay from Last-Event-ID, then live, with a comment heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator

from aiohttp import web

from gpud.api import keys
from gpud.api.sseresponse import EventStreamResponse
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
# What aiohttp may add to a write (chunk framing; the headers, if still buffered): counted when judging whether a
# write could fill the transport's buffer.
_FRAMING_SLACK = 1024


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
    request: web.Request,
    *,
    heartbeat: float,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    with_first_write: bool = False,
) -> EventStreamResponse:
    """Send the SSE headers now (any method, e.g. POST submit), so the caller can stream before work starts; with
    `with_first_write`, together with the events the caller writes next, at once. send_timeout also sets
    TCP_USER_TIMEOUT: the kernel drops a peer that acknowledges nothing for that long."""
    response = EventStreamResponse(send_timeout)
    await response.prepare(request, with_first_write=with_first_write)
    return response


async def stream_task_events(
    request: web.Request,
    log: TaskEventLog,
    *,
    heartbeat: float,
    response: EventStreamResponse | None = None,
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
        # Events already there are written at once: the headers go in the same packet.
        ready = log.last_id > after_id
        response = await open_event_stream(
            request, heartbeat=heartbeat, send_timeout=send_timeout, with_first_write=ready
        )
    stream = _Stream(request, response, log, heartbeat, send_timeout)
    metrics = request.app.get(keys.METRICS)  # an app built for a test may have none
    with metrics.sse_clients.track_inprogress() if metrics is not None else contextlib.nullcontext():
        finished = await stream.pump(after_id)
    if finished:
        try:
            async with asyncio.timeout(send_timeout):
                # The last events (task_finish) and the end of the response in one write.
                await response.write_eof(stream.last_chunk)
        except (ConnectionError, TimeoutError):
            stream.abort()
    return response


class _Stream:
    """One client's stream: the only writer of its response (events and heartbeat, never interleaved).

    Timers are kept off the per-event path (with 200 clients, a timeout per wait and per write was a fifth of
    gpud's time): a write gets its send timeout only when it could wait (see _may_block), and waiting for events
    uses one timer per stream, re-armed about once per _DISCONNECT_POLL, that interrupts the wait when it fires."""

    def __init__(
        self,
        request: web.Request,
        response: EventStreamResponse,
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
        self._task = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = False  # inside sub.wait(): the timer may interrupt it
        self._timer_fired = False  # the timer interrupted the wait (a cancellation of our own)
        self.last_chunk = b""  # the stream's last write, left for the response's end to carry

    async def pump(self, after_id: int) -> bool:
        """Write events as they come; True when the log ended, False when the client went away or stalled."""
        try:
            return await self._pump(after_id)
        finally:
            if self._timer is not None:
                self._timer.cancel()

    async def _pump(self, after_id: int) -> bool:
        with self.log.attach(after_id) as sub:
            while True:
                batch = sub.take(_BATCH, _WRITE_BYTES)
                if batch:
                    if sub.exhausted and sum(len(e.json_bytes) for e in batch) <= _WRITE_BYTES // 2:
                        # The last events (task_finish), small: written with the response's end, in one write.
                        self.last_chunk = b"".join(_chunks(batch))
                        return True
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

    def _may_block(self, size: int) -> bool:
        """Whether writing `size` more bytes could wait for the client: only once the transport's buffer may pass
        its low-water mark (below it, the protocol is not paused and the write cannot pause it, so aiohttp's drain
        returns at once)."""
        transport = self.request.transport
        if transport is None:
            return True
        try:
            low = transport.get_write_buffer_limits()[0]
        except (AttributeError, NotImplementedError):
            return True
        return transport.get_write_buffer_size() + size + _FRAMING_SLACK > low

    async def _write(self, chunks: Iterable[bytes | memoryview], position: int) -> bool:
        """Write every chunk, each within the send timeout; False (and the connection dropped) otherwise."""
        try:
            for chunk in chunks:
                if self._may_block(len(chunk)):
                    async with asyncio.timeout(self.send_timeout):
                        await self.response.write(chunk)
                else:
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
            now = self._loop.time()
            left = self._last_write + self.heartbeat - now
            if left <= 0:
                return "idle"
            if not await self._wait_until(sub, now + min(_DISCONNECT_POLL, left)):
                return "events"
            transport = self.request.transport
            if transport is None or transport.is_closing():
                return "gone"

    async def _wait_until(self, sub: Subscription, deadline: float) -> bool:
        """Wait for events until about `deadline` at the latest; True when the timer ended the wait (it may end it
        earlier: the caller looks at the time again)."""
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
        self._waiting = True
        try:
            await sub.wait()
        except asyncio.CancelledError:
            if not self._timer_fired or self._task is None or self._task.uncancel() > 0:
                raise  # not (only) our timer: a real cancellation
            return True
        finally:
            self._waiting = self._timer_fired = False
        return False

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiting and not self._timer_fired and self._task is not None:
            self._timer_fired = True
            self._task.cancel()

    def abort(self) -> None:
        """Drop the connection without a graceful close (a stalled peer would never take the rest)."""
        if self.request.transport is not None:
            self.request.transport.abort()
