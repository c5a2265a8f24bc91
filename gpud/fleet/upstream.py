"""Connections to the other fleet hosts for forwarded requests: pooled keep-alive HTTP/1.1 over asyncio, bytes through.

Why not aiohttp's client: a forwarded answer goes to the client unchanged, so parsing it into a ClientResponse and
writing it out again through a web.StreamResponse (per chunk: a read, a task switch, a write, chunk framing taken
off and put back) is work with no purpose; profiled, the client side was half of the forwarding host's time.
Here the request's head and body go out as one write; the response head is parsed (its status, so a 503 can try
the next host; its framing, to find where the answer ends so the connection can carry the next one), and every
body byte is handed on inside data_received, with no task switch, still framed as the owner framed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

# Idle connections kept per host (more are closed when released).
MAX_IDLE_PER_HOST = 16
# An idle connection older than this is not reused (gpud's own idle deadline closes it at the other end).
MAX_IDLE_SECONDS = 30.0
MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 4096


class UpstreamError(ConnectionError):
    """The host did not answer, or its answer was not HTTP/1.x as expected."""


@dataclass(frozen=True)
class ResponseHead:
    """A response's status line and headers, and how its body is framed."""

    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]  # as received, in order
    framing: str  # "length" | "chunked" | "close" | "empty"
    length: int = 0
    keep_alive: bool = True
    content_type: bytes = b""


def parse_head(raw: bytes, method: str) -> ResponseHead:
    """Status line and headers of a response (UpstreamError when malformed)."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    status = int(parts[1])
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    keep_alive = parts[0] == b"HTTP/1.1"
    content_type = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise UpstreamError(f"malformed header line {line[:80]!r}")
        value = value.strip()
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            length = int(value) if value.isdigit() else None
        elif lower == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif lower == b"connection":
            keep_alive = b"close" not in value.lower() and (keep_alive or b"keep-alive" in value.lower())
        elif lower == b"content-type":
            content_type = value
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        framing, length = "empty", 0
    elif chunked:
        framing = "chunked"
    elif length is not None:
        framing = "length"
    else:
        framing, keep_alive = "close", False
    return ResponseHead(status, parts[2].decode("latin-1") if len(parts) > 2 else "", headers, framing,
                        length or 0, keep_alive, content_type)  # fmt: skip


class BodyEnd:
    """Finds where a body ends in the bytes passing through, without copying them: Content-Length counted down, or
    chunk sizes read and chunk data skipped, up to the last chunk and its trailers."""

    def __init__(self, head: ResponseHead) -> None:
        self.framing = head.framing
        self._left = head.length  # length: body bytes still to come
        self._skip = 0  # chunked: chunk data and its CRLF still to pass
        self._line = b""  # chunked: a size or trailer line begun in an earlier piece
        self._trailers = False  # chunked: the last chunk was seen, trailer lines follow

    @property
    def at_boundary(self) -> bool:
        """Chunked, between two chunks: the client's stream can be ended cleanly here."""
        return self.framing == "chunked" and not self._skip and not self._line and not self._trailers

    def feed(self, data: bytes) -> int | None:
        """How many bytes of `data` belong to the body when it ends within them; None while it goes on."""
        if self.framing == "length":
            if len(data) >= self._left:
                taken, self._left = self._left, 0
                return taken
            self._left -= len(data)
            return None
        if self.framing != "chunked":
            return 0 if self.framing == "empty" else None
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                if len(self._line) > MAX_CHUNK_LINE:
                    raise UpstreamError("a chunk size line too long")
                return None
            line, self._line = self._line + data[pos:newline], b""
            pos = newline + 1
            if self._trailers:
                if not line.strip():
                    return pos  # the empty line after the last chunk: the body ends here
                continue
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise UpstreamError(f"bad chunk size {line[:40]!r}") from None
            if size:
                self._skip = size + 2
            else:
                self._trailers = True
        return None


class Upstream(asyncio.Protocol):
    """One connection to a host, carrying one forwarded request at a time."""

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.received = 0  # bytes of the current answer received so far
        self._buffer = b""
        self._method = "GET"
        self._head: asyncio.Future[ResponseHead] | None = None
        self._end: BodyEnd | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._done: asyncio.Future[bool] | None = None
        self.reusable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Connected."""
        self.transport = transport  # type: ignore[assignment]

    async def request(self, method: str, data: bytes) -> ResponseHead:
        """Send a whole request (head and body); its response head."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._head, self._method, self.received, self._buffer = loop.create_future(), method, 0, b""
        self._sink, self._done, self._end, self.reusable = None, None, None, False
        self.transport.write(data)
        return await self._head

    def data_received(self, data: bytes) -> None:
        """The head is buffered until complete; body bytes go straight to the sink."""
        self.received += len(data)
        if self._sink is not None:
            self._pass(data)
            return
        self._buffer += data
        if self._head is None or self._head.done():
            return
        found = self._buffer.find(b"\r\n\r\n")
        if found < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._head.set_exception(UpstreamError("response head too large"))
                self.abort()
            return
        raw, self._buffer = self._buffer[:found], self._buffer[found + 4 :]
        try:
            head = parse_head(raw, self._method)
        except (UpstreamError, ValueError) as exc:
            self._head.set_exception(UpstreamError(str(exc)))
            self.abort()
            return
        self._end = BodyEnd(head)
        self.reusable = head.keep_alive
        self._head.set_result(head)

    def relay(self, sink: Callable[[bytes], None]) -> asyncio.Future[bool]:
        """Pass the body to `sink` as it arrives (what came with the head first); the future is True when the
        body ended whole, False when the connection broke first."""
        self._done = asyncio.get_running_loop().create_future()
        self._sink = sink
        pending, self._buffer = self._buffer, b""
        self._pass(pending)  # also ends an empty body at once
        return self._done

    @property
    def at_boundary(self) -> bool:
        """Whether a broken chunked body broke between chunks."""
        return self._end is not None and self._end.at_boundary

    def _pass(self, data: bytes) -> None:
        assert self._end is not None and self._sink is not None
        if self._done is None or self._done.done():
            return
        try:
            taken = self._end.feed(data)
        except UpstreamError:
            self._finish(False)
            self.abort()
            return
        if taken is None:
            if data:
                self._sink(data)
            return
        if taken:
            self._sink(data[:taken] if taken < len(data) else data)
        if taken < len(data):
            self.reusable = False  # bytes after the answer: nothing should follow it
        self._finish(True)

    def _finish(self, whole: bool) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(whole)

    def pause(self) -> None:
        """Stop reading from the host (the client is slower)."""
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        """Read from the host again."""
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection (the host sees its answer's reader leave)."""
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """The host closed the connection or died: a pending head fails, a close-delimited body ends here."""
        self.closed = True
        self.reusable = False
        if self._head is not None and not self._head.done():
            self._head.set_exception(UpstreamError(f"the connection closed before an answer ({exc or 'EOF'})"))
        if self._done is not None and not self._done.done():
            self._done.set_result(self._end is not None and self._end.framing == "close")


class UpstreamPool:
    """Keep-alive connections to each host, taken for one request and given back when its answer ended whole."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, str, int], list[Upstream]] = {}
        self._tls: ssl.SSLContext | None = None

    async def send(self, url: str, method: str, data: bytes) -> tuple[Upstream, ResponseHead]:
        """Send a request to the host at `url`; the connection and the response head. A kept-alive connection
        that the host closed meanwhile (nothing of an answer received) is retried once on a new one."""
        key = _key(url)
        while True:
            upstream = self._take(key)
            reused = upstream is not None
            if upstream is None:
                upstream = await self._connect(key)
            try:
                return upstream, await upstream.request(method, data)
            except UpstreamError:
                upstream.abort()
                if not reused or upstream.received:
                    raise

    def release(self, upstream: Upstream) -> None:
        """Give a connection back after its answer ended whole (closed instead when it cannot carry another)."""
        idle = self._idle.setdefault(upstream.key, [])
        if upstream.reusable and not upstream.closed and len(idle) < MAX_IDLE_PER_HOST:
            upstream.idle_since = time.monotonic()
            idle.append(upstream)
        else:
            upstream.abort()

    def _take(self, key: tuple[str, str, int]) -> Upstream | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            upstream = idle.pop()
            if not upstream.closed and now - upstream.idle_since < MAX_IDLE_SECONDS:
                return upstream
            upstream.abort()
        return None

    async def _connect(self, key: tuple[str, str, int]) -> Upstream:
        scheme, host, port = key
        if scheme == "https" and self._tls is None:
            self._tls = ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: Upstream(key), host, port, ssl=self._tls if scheme == "https" else None
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"could not connect to {host}:{port}: {exc or 'timed out'}") from None
        return protocol

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for upstream in idle:
                with contextlib.suppress(Exception):
                    upstream.abort()
        self._idle.clear()


@functools.lru_cache(maxsize=256)
def _key(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme or "http"
    return scheme, parts.hostname or "127.0.0.1", parts.port or (443 if scheme == "https" else 80)
