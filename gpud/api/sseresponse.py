"""The HTTP response an SSE stream is written to: aiohttp_sse's EventSourceResponse without its ping task.

gpud writes its events and heartbeats itself, from the one coroutine that writes a stream (gpud/api/sse.py): the
library's ping task could write between the slices of a big event, and it costs a task per stream. So `prepare`
here keeps the library's headers and TCP_USER_TIMEOUT (set once per connection, and left set) and starts no ping
task; it can also hold the headers back to go out with the first events (one packet instead of two).
"""

from __future__ import annotations

import socket
import weakref
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

# The TCP_USER_TIMEOUT (ms) set on each connection: set by its first stream and left set (see _set_tcp_user_timeout).
_USER_TIMEOUT_SET: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


class EventStreamResponse(EventSourceResponse):
    """A chunked text/event-stream response. With `send_timeout`, the kernel drops a TCP peer that acknowledges
    nothing for that long (TCP_USER_TIMEOUT) while the stream lasts: a hung peer is found as soon as any write
    goes unacknowledged, long before enough data queues up for a send to block."""

    def __init__(self, send_timeout: float | None) -> None:
        super().__init__(sep="\n", allow_all_methods=True, send_timeout=send_timeout)

    async def prepare(self, request: web.BaseRequest, *, with_first_write: bool = False) -> AbstractStreamWriter | None:
        """Send the headers: now, or with `with_first_write` together with the first write that follows at once
        (the caller writes before it awaits anything else)."""
        if self.prepared:
            return await super().prepare(request)  # the library's check that the client is still there
        self._set_tcp_user_timeout(request)
        if with_first_write:
            # aiohttp's own switch (web.Response uses it): headers go out with the first body write.
            self._send_headers_immediately = False
        # StreamResponse.prepare, not the library's: that one would start the ping task.
        writer = await web.StreamResponse.prepare(self, request)
        self.enable_chunked_encoding()  # as the library does: no length is known beforehand
        return writer

    def _set_tcp_user_timeout(self, request: web.BaseRequest) -> None:
        """Set TCP_USER_TIMEOUT once per connection and leave it set: the library saves and restores it around each
        response, three syscalls per task on a keep-alive connection. Any gpud client that acknowledges nothing
        for the send time-out is gone, whatever it asked for."""
        transport = request.transport
        timeout = self._send_timeout
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if transport is None or timeout is None or option is None:
            return
        wanted = int(timeout * 1000)
        if _USER_TIMEOUT_SET.get(transport) == wanted:
            return
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.IPPROTO_TCP, option, wanted)
        _USER_TIMEOUT_SET[transport] = wanted
