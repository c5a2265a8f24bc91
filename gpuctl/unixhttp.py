"""A minimal HTTP/1.1 client over a Unix socket: one request per connection, Content-Length or chunked bodies.

Why not http.client: importing it pulls in email parsing and ssl, about a fifth of gpuctl's start-up time here,
for features an admin socket never needs (TLS, proxies, keep-alive, header folding).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

MAX_HEADER_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
# What a path segment keeps as is (RFC 3986 unreserved); urllib.parse.quote(value, safe="") keeps the same.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def quote_segment(value: str) -> str:
    """A URL path segment: every byte of the UTF-8 but the unreserved ones percent-encoded (as urllib.parse.quote
    with safe="", without importing urllib.parse, which a production gpuctl would load only for this)."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in value.encode("utf-8"))


class ConnectFailed(OSError):
    """connect() to the socket failed; errno says why (ENOENT, ECONNREFUSED, EACCES, ...)."""


class BrokenResponse(OSError):
    """The response ended early or is not valid HTTP/1.1."""


@dataclass
class Response:
    """Status, lower-cased headers, and the body read on demand (streamed as it arrives)."""

    status: int
    reason: str
    headers: dict[str, str]
    _stream: BinaryIO
    _sock: socket.socket
    _closed: bool = field(default=False)

    def chunks(self) -> Iterator[bytes]:
        """The body's bytes as they arrive, de-chunked."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            yield from self._chunked()
        elif "content-length" in self.headers:
            yield from self._sized(int(self.headers["content-length"]))
        else:
            while data := self._stream.read1(READ_SIZE):  # type: ignore[attr-defined]
                yield data

    def read(self) -> bytes:
        """The whole body."""
        return b"".join(self.chunks())

    def lines(self) -> Iterator[bytes]:
        """The body split into lines (each with its newline, the last maybe without), each as soon as complete."""
        pending = b""
        for data in self.chunks():
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line + b"\n"
        if pending:
            yield pending

    def close(self) -> None:
        """Close the connection."""
        if not self._closed:
            self._closed = True
            self._stream.close()
            self._sock.close()

    def _sized(self, length: int) -> Iterator[bytes]:
        left = length
        while left > 0:
            data = self._stream.read1(min(left, READ_SIZE))  # type: ignore[attr-defined]
            if not data:
                raise BrokenResponse(errno.EPIPE, f"body ended {left} bytes early")
            left -= len(data)
            yield data

    def _chunked(self) -> Iterator[bytes]:
        while True:
            size_line = self._stream.readline(1024)
            if not size_line.endswith(b"\n"):
                raise BrokenResponse(errno.EPIPE, "chunked body ended early")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BrokenResponse(errno.EPROTO, f"bad chunk size line {size_line!r}") from None
            if size == 0:
                return  # trailers, if any, are never used by gpud; the connection closes anyway
            yield from self._sized(size)
            if self._stream.read(2) != b"\r\n":
                raise BrokenResponse(errno.EPROTO, "chunk not followed by CRLF")


def request(
    path: str,
    method: str,
    target: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> Response:
    """Send one request on a new connection and read the status and headers; the body is left to the caller."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ConnectFailed(exc.errno, exc.strerror) from None
    try:
        sock.sendall(_head(method, target, body, headers or {}) + (body or b""))
        stream = sock.makefile("rb")
        status, reason, parsed = _read_head(stream)
    except BaseException:
        sock.close()
        raise
    return Response(status, reason, parsed, stream, sock)


def _head(method: str, target: str, body: bytes | None, headers: Mapping[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gpud", "Connection: close", "Accept-Encoding: identity"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_head(stream: BinaryIO) -> tuple[int, str, dict[str, str]]:
    status_line = stream.readline(MAX_HEADER_BYTES)
    parts = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise BrokenResponse(errno.EPROTO, f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    total = len(status_line)
    while True:
        line = stream.readline(MAX_HEADER_BYTES)
        total += len(line)
        if not line.endswith(b"\n") or total > MAX_HEADER_BYTES:
            raise BrokenResponse(errno.EPROTO, "response headers ended early or are too large")
        if line in (b"\r\n", b"\n"):
            return int(parts[1]), parts[2] if len(parts) > 2 else "", headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
