"""Forwarding one request to the fleet host that owns it, and passing its answer back as the owner framed it.

The request goes out as bytes on a pooled keep-alive connection (gpud/fleet/upstream.py): the client's method,
path and headers, less the hop-by-hop ones, plus the fleet key, X-Gpud-Forwarded-By and X-Forwarded-For, then the
body. The answer's head is parsed (a 503 may try the next host) and written to the client's connection with the
owner's own headers; its body bytes follow as they arrive, untouched (Content-Length or chunked, as the owner sent
them), from inside the upstream connection's data_received. A client that leaves closes the owner's connection (its
stream ends there as if the client had been attached to it); an owner that dies ends the client's stream (cleanly
between two chunks, so the client may resume with Last-Event-ID; else by closing the connection).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from gpud.errors import Unavailable
from gpud.fleet.service import Fleet, Route
from gpud.fleet.upstream import ResponseHead, Upstream, UpstreamError, UpstreamPool

logger = logging.getLogger(__name__)

FLEET_KEY_HEADER = "X-Gpud-Fleet-Key"
FORWARDED_BY_HEADER = "X-Gpud-Forwarded-By"
# Request headers that describe one connection, not the request (RFC 9110 7.6.1), or that this host sets itself.
REQUEST_DROP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect", b"x-forwarded-for",
        b"x-gpud-forwarded-by", b"x-gpud-fleet-key",
    }
)  # fmt: skip
# Response headers of the owner's connection only (its framing headers go through: the body bytes keep it).
RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"upgrade"})
# Past this many bytes waiting for the client, reading from the owner pauses until they drain.
HIGH_WATER = 256 * 1024
# How often a quiet relayed stream looks for a client that left (any byte from the owner notices at once).
CLIENT_CHECK_SECONDS = 1.0


def request_bytes(request: web.Request, fleet: Fleet, host: str, body: bytes) -> bytes:
    """The request as it goes to the owner: head and body, one buffer."""
    version = b"HTTP/1.0" if request.version < (1, 1) else b"HTTP/1.1"
    lines = [request.method.encode() + b" " + request.raw_path.encode() + b" " + version, b"Host: " + host.encode()]
    lines += [name + b": " + value for name, value in request.raw_headers if name.lower() not in REQUEST_DROP]
    lines.append(FLEET_KEY_HEADER.encode() + b": " + fleet.config.key.encode())
    lines.append(FORWARDED_BY_HEADER.encode() + b": " + fleet.host_id.encode())
    if request.remote:
        lines.append(b"X-Forwarded-For: " + request.remote.encode())
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def forward(
    request: web.Request, fleet: Fleet, route: Route, body: bytes, try_next: bool = False
) -> web.StreamResponse | None:
    """Send the request to `route`'s host and pass its answer through as it comes; with `try_next`, None when that
    host answers 503 or does not answer (the caller tries another)."""
    assert route.url is not None
    pool: UpstreamPool = fleet.upstream
    started = time.perf_counter()
    try:
        upstream, head = await pool.send(route.url, request.method, request_bytes(request, fleet, route.netloc, body))
    except UpstreamError as exc:
        fleet.metrics.forwarded.labels("error").inc()
        logger.warning("fleet: host %s (%s) did not answer: %s", route.host, route.url, exc)
        if try_next:
            return None
        raise Unavailable(
            f"host {route.host}, which has this {request.path.split('/')[2][:-1]}, did not answer",
            code="fleet_host_unreachable",
            retry_after=1.0,
        ) from None
    metrics = fleet.metrics
    metrics.forward_duration.observe(time.perf_counter() - started)
    if try_next and head.status == 503:
        metrics.forwarded_unavailable.inc()
        upstream.abort()
        return None
    metrics.forwarded_ok.inc()
    response = Relayed(pool, upstream, head)
    await response.prepare(request)
    return response


class Relayed(web.StreamResponse):
    """The owner's answer, written to the client's connection byte for byte; aiohttp's own writer stays unused."""

    def __init__(self, pool: UpstreamPool, upstream: Upstream, head: ResponseHead) -> None:
        super().__init__(status=head.status, reason=head.reason)
        self._pool = pool
        self._upstream = upstream
        self._head = head  # written as received: self.headers stays empty (nothing reads it)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Write the head, then pass the body through until it ends, the client leaves or the owner dies."""
        if self._eof_sent:
            return None
        self._eof_sent = True  # finish_response's prepare and write_eof then do nothing
        head, upstream = self._head, self._upstream
        keep = request.keep_alive and head.framing != "close"
        self._keep_alive = keep
        transport = request.transport
        if transport is None or transport.is_closing():
            upstream.abort()
            return None
        version = b"HTTP/1.0" if request.version < (1, 1) else b"HTTP/1.1"
        lines = [version + b" %d " % head.status + head.reason.encode("latin-1")]
        lines += [n + b": " + v for n, v in head.headers if n.lower() not in RESPONSE_DROP]
        if not keep and version == b"HTTP/1.1":
            lines.append(b"Connection: close")
        elif keep and version == b"HTTP/1.0":
            lines.append(b"Connection: keep-alive")
        pump = _Pump(transport, upstream, b"\r\n".join(lines) + b"\r\n\r\n")
        done = upstream.relay(pump)  # the body bytes that came with the head go out with it, in one write
        pump.flush()
        whole = await pump.run(request, done)
        self._body_length = pump.sent
        if whole:
            self._pool.release(upstream)
            return None
        upstream.abort()
        if transport.is_closing():
            logger.debug("fleet: the client of %s left; the owner's stream ended with it", request.path)
        elif upstream.at_boundary:
            transport.write(b"0\r\n\r\n")  # between two events: end the stream cleanly (resumable)
            logger.info("fleet: the owner's stream of %s broke; ended the client's", request.path)
        else:
            self._keep_alive = False
            transport.close()
            logger.info("fleet: the owner's answer to %s broke; closed the client's connection", request.path)
        return None


class _Pump:
    """The sink of a relayed body: each piece written to the client's transport at once."""

    def __init__(self, transport: asyncio.BaseTransport, upstream: Upstream, head: bytes) -> None:
        self._transport: asyncio.WriteTransport = transport  # type: ignore[assignment]
        self._upstream = upstream
        self._head = head  # the response head, written with the first body bytes
        self._wake: asyncio.Future[None] | None = None
        self.paused = False
        self.sent = 0

    def __call__(self, data: bytes) -> None:
        transport = self._transport
        if transport.is_closing():
            self._upstream.abort()  # the client left: the owner sees its reader go
            return
        self.sent += len(data)
        if self._head:
            data, self._head = self._head + data, b""
        transport.write(data)
        if transport.get_write_buffer_size() > HIGH_WATER and not self.paused:
            self.paused = True
            self._upstream.pause()
            self._poke()

    def flush(self) -> None:
        """Write the head now if no body byte came with it."""
        if self._head and not self._transport.is_closing():
            self._transport.write(self._head)
        self._head = b""

    def _poke(self, _: object = None) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def run(self, request: web.BaseRequest, done: asyncio.Future[bool]) -> bool:
        """Until the body ended (True) or broke (False); drains the client's side while reading is paused. One
        future per wait, woken by the body's end, a pause, or a timer that looks for a client gone quiet."""
        loop = asyncio.get_running_loop()
        done.add_done_callback(self._poke)
        while not done.done():
            if self.paused:
                await request.writer.drain()
                if self._transport.get_write_buffer_size() > HIGH_WATER // 4 and not self._transport.is_closing():
                    await asyncio.sleep(0.005)
                    continue
                self.paused = False
                self._upstream.resume()
            self._wake = loop.create_future()
            timer = loop.call_later(CLIENT_CHECK_SECONDS, self._poke)
            try:
                await self._wake
            finally:
                timer.cancel()
            if self._transport.is_closing() and not done.done():
                self._upstream.abort()
        return done.result() and not self._transport.is_closing()
