"""Accepting one app's connections behind its guard, and serving an aiohttp app that way (`serve`).

gpud accepts itself instead of letting asyncio's server do it, for two reasons found under a slowloris flood:
- a connection past the cap is answered (503) and closed in the same step that accepted it (or, if its request
  is still on the way, soon after: at most REFUSED_LINGER_MAX wait). Through asyncio's server each one would
  first become a task, a transport and a protocol, and hold its fd for several loop turns: with 1100 attackers
  that was ~350 descriptors beyond the cap;
- when accept() fails for want of descriptors, asyncio logs a traceback per failure (the review's 389 MB log);
  here it is one throttled line, and accepting pauses for a second (as asyncio does) so the loop does not spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gpud.api.connections import ConnectionGuard
from gpud.api.logthrottle import LogThrottle

logger = logging.getLogger(__name__)

# Connections taken per readiness event (asyncio uses its backlog, 100, the same way): others get their turn.
ACCEPT_BATCH = 128
# accept() failing for want of descriptors or memory: wait this long before trying again.
ACCEPT_RETRY_SECONDS = 1.0
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A refused connection whose request has not arrived yet is kept this long (reading and dropping it) so that
# the client reads the 503 rather than a reset or a broken pipe; at most REFUSED_LINGER_MAX of them at a time.
REFUSED_LINGER_SECONDS = 0.5
REFUSED_LINGER_MAX = 32
# How long running requests (streams) get to finish when the daemon stops, after every task has ended.
SHUTDOWN_TIMEOUT = 5.0
# How long aiohttp keeps reading (and dropping) a body its handler left unread, so that the client sees the
# response before the close: aiohttp's default of 10 s would let a trickled body hold its connection that long.
LINGER_SECONDS = 2.0


def _drained(conn: socket.socket) -> bool:
    """Drop what the peer has sent so far (a bounded amount); True once it has closed its side or is gone."""
    try:
        for _ in range(4):
            if not conn.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


class GuardedListener:
    """Accepts on a listening socket: refuses past the guard's cap, hands the rest to `factory`'s protocol."""

    def __init__(
        self,
        sock: socket.socket,
        guard: ConnectionGuard,
        factory: Callable[[], Any],
        throttle: LogThrottle | None = None,
    ) -> None:
        self._sock = sock
        self._guard = guard
        self._factory = factory
        self._throttle = throttle or LogThrottle()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._adopting: set[asyncio.Task[None]] = set()
        self._lingering: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self._closed = False

    def start(self) -> None:
        """Start accepting (in the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._resume()

    def close(self) -> None:
        """Stop accepting and close the listening socket; open connections are the app runner's to end."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for task in self._adopting:
            task.cancel()
        for fd in list(self._lingering):
            self._end_linger(fd)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept_some)

    def _accept_some(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up before we got to it
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._out_of_resources(exc)
                    return
                # Linux reports some network errors of the pending connection from accept(): skip that one.
                logger.debug("%s API: accept() failed: %s", self._guard.name, exc)
                continue
            if self._guard.try_admit():
                self._adopt(conn)
            else:
                self._refuse(conn)

    def _out_of_resources(self, exc: OSError) -> None:
        """Out of descriptors (or memory): Linux keeps the socket readable, so stop reading for a while."""
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume)
        name = self._guard.name
        if self._throttle.admit(("accept", name, exc.errno), f"accept() failures on the {name} API ({exc.strerror})"):
            logger.error(
                "%s API: accept() failed: %s (the open-file limit is reached?); retrying every %g s",
                name, exc, ACCEPT_RETRY_SECONDS,
            )  # fmt: skip

    def _refuse(self, conn: socket.socket) -> None:
        """Answer a connection past the cap and close it, at once unless its request is still on the way."""
        try:
            conn.setblocking(False)
            conn.send(self._guard.refusal)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        # Closing with unread bytes makes the kernel reset the connection, which can cost the client the answer
        # (over a Unix socket the request may not even have been sent yet): read and drop them first.
        if _drained(conn) or len(self._lingering) >= REFUSED_LINGER_MAX:
            conn.close()
            return
        assert self._loop is not None
        fd = conn.fileno()
        self._lingering[fd] = (conn, self._loop.call_later(REFUSED_LINGER_SECONDS, self._end_linger, fd))
        self._loop.add_reader(fd, self._linger_read, fd)

    def _linger_read(self, fd: int) -> None:
        if _drained(self._lingering[fd][0]):
            self._end_linger(fd)

    def _end_linger(self, fd: int) -> None:
        conn, timer = self._lingering.pop(fd)
        timer.cancel()
        assert self._loop is not None
        self._loop.remove_reader(fd)
        conn.close()

    def _adopt(self, conn: socket.socket) -> None:
        assert self._loop is not None
        conn.setblocking(False)
        task = self._loop.create_task(self._connect(conn))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        """Make the transport and aiohttp's protocol (behind the guard) for an admitted connection."""
        assert self._loop is not None
        made = False

        def protocol() -> asyncio.Protocol:
            nonlocal made
            made = True
            return self._guard.protocol(self._factory())

        try:
            await self._loop.connect_accepted_socket(protocol, sock=conn)
        except BaseException as exc:
            conn.close()
            if not made:
                self._guard.give_back()  # else the protocol's own deadline gives the slot back
            if not isinstance(exc, Exception):
                raise
            logger.debug("%s API: could not take a connection: %s", self._guard.name, exc)


async def serve(
    app: web.Application,
    sock: socket.socket,
    guard: ConnectionGuard,
    stack: contextlib.AsyncExitStack,
    throttle: LogThrottle | None = None,
) -> None:
    """Serve `app` on a listening socket behind `guard`; unwinding `stack` stops accepting, then ends gracefully."""
    app.middlewares.insert(0, guard.middleware())  # outermost: a request counts from its first middleware
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        # The guard's idle deadline rules; aiohttp's own keep-alive close is only a backstop behind it.
        keepalive_timeout=guard.limits.idle_timeout + guard.limits.header_timeout,
        lingering_time=LINGER_SECONDS,
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    assert runner.server is not None
    listener = GuardedListener(sock, guard, runner.server, throttle)
    listener.start()
    # Unwound first: stop accepting; then runner.cleanup() lets running requests finish and closes the rest.
    stack.callback(listener.close)
