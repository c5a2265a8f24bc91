"""A guard on one listener's connections: a cap on how many are open, a header deadline and an idle deadline.

aiohttp has a keep-alive timeout but no header-read timeout and no cap on connections, so a client that opens
many connections and sends nothing (slowloris) holds file descriptors until the daemon has none left (security
review, HIGH-2). The guard stands between a listener (gpud.api.listener) and aiohttp's protocol:

- past `max_connections` open connections, a new one gets a short `503` and is closed at once (no fd is held;
  gpud.api.listener accepts and refuses in one step);
- a connection must send a whole request head within `header_timeout` of opening, or of the first byte of its
  next request;
- between requests it may stay idle at most `idle_timeout`;
- while a request is being handled (a long SSE stream included) neither timer runs: the guard's middleware tells
  it when each request starts and ends. Reading a slow request body is bounded by the route (read_json_object).

Each listener has its own guard, so a flood on the public port leaves the admin socket's room untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gpud.api.logthrottle import LogThrottle
from gpud.metrics import Metrics

logger = logging.getLogger(__name__)


def refusal_bytes(name: str) -> bytes:
    """The whole 503 a connection past the cap gets: gpud's error shape, Connection: close."""
    body = json.dumps(
        {"error": {"code": "too_many_connections", "message": f"the {name} API has too many open connections"}}
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


@dataclass(frozen=True)
class ConnectionLimits:
    """One listener's limits."""

    max_connections: int
    header_timeout: float
    idle_timeout: float


class GuardedConnection(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol: counts the connection and runs its deadlines."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = 0  # requests being handled (aiohttp handles one at a time; a counter is simply safe)
        self._idle = False  # between requests, no byte of the next one seen yet
        self._released = False
        # Armed before connection_made: if the transport never comes up, the timer still gives the slot back.
        self._arm(guard.limits.header_timeout, "header")

    # asyncio.Protocol, delegated to aiohttp's RequestHandler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Record the transport, then let aiohttp start."""
        self.transport = transport  # type: ignore[assignment]
        self._guard._by_transport[transport] = self
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """The first byte after an idle spell starts the header deadline."""
        if self._idle and data:
            self._idle = False
            self._arm(self._guard.limits.header_timeout, "header")
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Delegated."""
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        """Delegated."""
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        """Delegated."""
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """Give the slot back, then let aiohttp clean up."""
        self._release()
        self._inner.connection_lost(exc)

    # Requests, as the guard's middleware reports them

    def request_started(self) -> None:
        """A request head arrived and is being handled: no deadline until it ends."""
        self._busy += 1
        self._idle = False
        self._cancel_timer()

    def request_ended(self) -> None:
        """The handler returned: the connection may idle until the next request."""
        self._busy -= 1
        if self._busy == 0 and not self._released:
            self._idle = True
            self._arm(self._guard.limits.idle_timeout, "idle")

    # Deadlines

    def _arm(self, delay: float, reason: str) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire, reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, reason: str) -> None:
        self._timer = None
        if self._busy:
            return
        transport = self.transport
        if transport is None:
            self._release()  # the transport never came up
            return
        self._guard._timed_out(reason)
        if transport.get_write_buffer_size():
            transport.abort()  # a response the peer will not read must not hold the fd either
        else:
            transport.close()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._cancel_timer()
        if self.transport is not None:
            self._guard._by_transport.pop(self.transport, None)
        self._guard._released()


class ConnectionGuard:
    """Counts one listener's connections, refuses those past the cap, and closes those that idle too long."""

    def __init__(
        self,
        name: str,
        limits: ConnectionLimits,
        metrics: Metrics | None = None,
        throttle: LogThrottle | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.refused = 0
        self.timed_out = {"header": 0, "idle": 0}
        self._open = 0
        self._by_transport: dict[asyncio.BaseTransport, GuardedConnection] = {}
        self._metrics = metrics
        self._throttle = throttle or LogThrottle()
        self.refusal = refusal_bytes(name)

    @property
    def open(self) -> int:
        """Connections counted now (accepted and not yet closed)."""
        return self._open

    def try_admit(self) -> bool:
        """Count one more connection if the cap allows (True); else count and log a refusal (False)."""
        if self._open >= self.limits.max_connections:
            self._refuse()
            return False
        self._open += 1
        self._observe_open()
        return True

    def protocol(self, inner: asyncio.Protocol) -> GuardedConnection:
        """aiohttp's protocol for an admitted connection, behind the guard (its header deadline starts now)."""
        return GuardedConnection(self, inner)

    def give_back(self) -> None:
        """An admitted connection never got its protocol (the transport could not be made)."""
        self._released()

    def middleware(self) -> Middleware:
        """Marks each request's start and end on its connection, so no deadline runs while it is handled."""

        @web.middleware
        async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
            conn = self._by_transport.get(request.transport) if request.transport is not None else None
            if conn is None:
                return await handler(request)
            conn.request_started()
            try:
                return await handler(request)
            finally:
                conn.request_ended()

        return track

    def _refuse(self) -> None:
        self.refused += 1
        if self._metrics is not None:
            self._metrics.http_connections_refused.labels(self.name).inc()
        if self._throttle.admit(("refused", self.name), f"connections refused on the {self.name} API (cap reached)"):
            logger.warning(
                "%s API: %d connections are open, the cap: refusing new ones with 503 (raise %s if this is load)",
                self.name, self.limits.max_connections,
                "GPUD_ADMIN_MAX_CONNECTIONS" if self.name == "admin" else "GPUD_MAX_CONNECTIONS",
            )  # fmt: skip

    def _timed_out(self, reason: str) -> None:
        self.timed_out[reason] += 1
        if self._metrics is not None:
            self._metrics.http_connections_timed_out.labels(self.name, reason).inc()
        limit = self.limits.header_timeout if reason == "header" else self.limits.idle_timeout
        what = "no complete request head" if reason == "header" else "no new request"
        kind = f"{self.name} connections closed ({reason} timeout)"
        if self._throttle.admit(("timeout", self.name, reason), kind, logging.INFO):
            logger.info("%s API: closed a connection that sent %s within %g s", self.name, what, limit)

    def _released(self) -> None:
        self._open -= 1
        self._observe_open()

    def _observe_open(self) -> None:
        if self._metrics is not None:
            self._metrics.http_connections_open.labels(self.name).set(self._open)
