"""The connection guard on a real aiohttp server on loopback: the cap, the header and idle deadlines, and that a
request being handled (a stream) is never cut. Also the log throttle and the loop's exception handler."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from gpud.api.connections import ConnectionGuard, ConnectionLimits
from gpud.api.listener import ACCEPT_RETRY_SECONDS, GuardedListener, serve
from gpud.api.logthrottle import LogThrottle
from gpud.daemon.resources import FD_RESERVE, LoopErrors, fit_caps
from tests.waiting import wait_until

CAP = 3
HEADER = 0.3
IDLE = 0.5
REQUEST = b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n"


@dataclass
class Served:
    """A guarded server on loopback and its guard."""

    guard: ConnectionGuard
    port: int

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw TCP connection to it."""
        return await asyncio.open_connection("127.0.0.1", self.port)


async def _fast(request: web.Request) -> web.Response:
    """Answers at once."""
    return web.Response(text="ok")


async def _stream(request: web.Request) -> web.StreamResponse:
    """Writes a chunk every 0.2 s for 1.6 s: longer than the header and idle deadlines together."""
    response = web.StreamResponse()
    await response.prepare(request)
    for i in range(8):
        await response.write(f"chunk {i}\n".encode())
        await asyncio.sleep(0.2)
    await response.write_eof()
    return response


async def _silent(request: web.Request) -> web.Response:
    """Says nothing for longer than both deadlines, then answers."""
    await asyncio.sleep(HEADER + IDLE + 0.4)
    return web.Response(text="late")


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """An app with a quick route, a long stream and a slow handler, behind a guard with small limits."""
    app = web.Application()
    app.router.add_get("/fast", _fast)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/silent", _silent)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    guard = ConnectionGuard("public", ConnectionLimits(CAP, HEADER, IDLE))
    async with contextlib.AsyncExitStack() as stack:
        await serve(app, sock, guard, stack)
        yield Served(guard, port)


async def _read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(timeout):
            while data := await reader.read(65536):
                chunks.append(data)
    return b"".join(chunks)


async def test_past_the_cap_a_connection_gets_503_and_is_closed(served: Served) -> None:
    held = [await served.connect() for _ in range(CAP)]
    await wait_until(lambda: served.guard.open == CAP, "the cap's connections counted")
    reader, writer = await served.connect()
    started = time.monotonic()
    answer = await _read_all(reader)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in answer
    assert b'"code": "too_many_connections"' in answer
    assert time.monotonic() - started < HEADER, "refused at once, not after a deadline"
    assert served.guard.refused == 1 and served.guard.open == CAP
    writer.close()
    held[0][1].close()
    await wait_until(lambda: served.guard.open == CAP - 1, "a slot given back when a connection closes")
    reader, writer = await served.connect()
    writer.write(REQUEST.replace(b"Host: t", b"Host: t\r\nConnection: close"))
    assert (await _read_all(reader)).startswith(b"HTTP/1.1 200 ")
    for _, w in held[1:]:
        w.close()


async def test_no_request_head_in_time_is_closed(served: Served) -> None:
    silent = await served.connect()
    half = await served.connect()
    half[1].write(b"GET /fast HTTP/1.1\r\nHost: t\r\n")  # never the blank line
    started = time.monotonic()
    assert await _read_all(silent[0]) == b""
    assert await _read_all(half[0]) == b""
    elapsed = time.monotonic() - started
    assert HEADER * 0.8 <= elapsed < HEADER + 1.0, elapsed
    assert served.guard.timed_out["header"] == 2
    await wait_until(lambda: served.guard.open == 0, "slots given back")


async def test_idle_keep_alive_is_closed_and_a_busy_one_is_not(served: Served) -> None:
    reader, writer = await served.connect()
    for i in range(4):  # requests closer together than the idle deadline keep the connection, past IDLE in all
        if i:
            await asyncio.sleep(IDLE / 2)
        writer.write(REQUEST)
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200 ")
    answered = time.monotonic()
    assert await _read_all(reader) == b""  # then idle: closed
    assert IDLE * 0.8 <= time.monotonic() - answered < IDLE + 1.0
    assert served.guard.timed_out == {"header": 0, "idle": 1}


async def test_the_next_request_head_has_the_header_deadline(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(REQUEST)
    await reader.readuntil(b"ok")
    writer.write(b"GET /fast HTTP/1.1\r\n")  # the next head starts, and stalls
    started = time.monotonic()
    assert await _read_all(reader) == b""
    assert time.monotonic() - started < IDLE, "the header deadline, not the longer idle one"
    assert served.guard.timed_out["header"] == 1


@pytest.mark.parametrize("path", ["/stream", "/silent"])
async def test_a_request_being_handled_is_never_cut(served: Served, path: str) -> None:
    reader, writer = await served.connect()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    answer = await _read_all(reader)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert (b"chunk 7" if path == "/stream" else b"late") in answer
    assert served.guard.timed_out == {"header": 0, "idle": 0}


def test_throttle_admits_one_per_interval_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("t"), interval=10.0, clock=lambda: now[0])
    assert throttle.admit("k", "things")
    assert [throttle.admit("k", "things") for _ in range(5)] == [False] * 5
    assert throttle.admit("other", "others"), "kinds are counted apart"
    assert throttle.held("k") == 5
    now[0] = 10.5
    with caplog.at_level(logging.WARNING, "t"):
        assert throttle.admit("k", "things")
    assert "5 more things in the last 10 s" in caplog.text
    assert throttle.held("k") == 0


async def test_throttle_reports_the_count_when_the_interval_ends(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(logging.getLogger("t"), interval=0.2)
    with caplog.at_level(logging.WARNING, "t"):
        assert throttle.admit("k", "things")
        assert not throttle.admit("k", "things")
        await wait_until(lambda: "1 more things" in caplog.text, "the summary line after the interval")


async def test_loop_errors_throttle_accept_failures_and_pass_others_on(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    handler = LoopErrors(LogThrottle(logging.getLogger("t"), interval=60.0))
    emfile = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.DEBUG):
        for _ in range(1000):
            handler(loop, {"message": "socket.accept() out of system resource", "exception": emfile})
        for _ in range(3):
            handler(loop, {"message": "Task exception was never retrieved", "exception": RuntimeError("boom")})
    lines = caplog.text.splitlines()
    assert sum("out of system resource" in line for line in lines) == 1
    assert "Traceback" not in caplog.text.split("Task exception")[0], "the accept failure is one line"
    assert sum("Task exception was never retrieved" in line for line in lines) == 1, "others: the default handler"
    assert handler.throttle.held(("resource", errno.EMFILE)) == 999


def test_caps_fit_the_fd_limit(caplog: pytest.LogCaptureFixture) -> None:
    assert fit_caps(1024, 64, 65536) == fit_caps(1024, 64, 65536)
    assert fit_caps(1024, 64, 65536).public == 1024
    with caplog.at_level(logging.WARNING):
        caps = fit_caps(1024, 64, 1024)
    assert caps.public == 1024 - 64 - FD_RESERVE and caps.admin == 64
    assert "using 704" in caplog.text and "LimitNOFILE" in caplog.text


class _OutOfFds(socket.socket):
    """A real listening socket whose accept() fails as it does when the process has no descriptors left."""

    attempts = 0

    def accept(self) -> tuple[socket.socket, object]:
        """Always EMFILE."""
        type(self).attempts += 1
        raise OSError(errno.EMFILE, "Too many open files")


async def test_accept_out_of_fds_is_one_line_and_no_busy_loop(caplog: pytest.LogCaptureFixture) -> None:
    sock = _OutOfFds()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    guard = ConnectionGuard("public", ConnectionLimits(CAP, HEADER, IDLE))
    listener = GuardedListener(sock, guard, lambda: None, LogThrottle(logging.getLogger("t"), interval=60.0))
    client = socket.create_connection(sock.getsockname())  # pending forever: the socket stays readable
    with caplog.at_level(logging.DEBUG):
        listener.start()
        await asyncio.sleep(ACCEPT_RETRY_SECONDS * 2.5)
        listener.close()
    client.close()
    assert 2 <= _OutOfFds.attempts <= 4, "one attempt per retry interval, not one per loop turn"
    errors = [r for r in caplog.records if "accept() failed" in r.getMessage()]
    assert len(errors) == 1 and "open-file limit" in errors[0].getMessage() and not errors[0].exc_info
