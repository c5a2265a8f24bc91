"""SSE under load: big events go out in bounded slices, never cut by the heartbeat, and a client that stops
reading is dropped after the send timeout (security review, finding 3)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestServer

from gpud.api.sse import _WRITE_BYTES, _chunks, format_event, stream_task_events
from gpud.work.events import EventType, TaskEventLog
from tests.waiting import wait_until

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


def app_for(log: TaskEventLog, heartbeat: float, send_timeout: float) -> web.Application:
    async def events(request: web.Request) -> web.StreamResponse:
        return await stream_task_events(request, log, heartbeat=heartbeat, send_timeout=send_timeout)

    app = web.Application()
    app.router.add_get("/events", events)
    return app


def test_chunks_are_bounded_and_concatenate_to_the_frames() -> None:
    log = TaskEventLog("t")
    log.append(EventType.LOGS, {"stream": "x", "line": "a"})
    log.append(EventType.TEXT_DELTA, {"delta": "b" * 10})
    log.output.replace("y" * (3 * _WRITE_BYTES + 17))
    log.append_text()
    chunks = list(_chunks(log.events()))
    assert max(len(c) for c in chunks) <= _WRITE_BYTES
    assert b"".join(bytes(c) for c in chunks) == b"".join(format_event(e) for e in log.events())


async def test_big_events_are_not_cut_by_a_fast_heartbeat(aiohttp_server: ServerFactory) -> None:
    log = TaskEventLog("t")
    server = await aiohttp_server(app_for(log, heartbeat=0.01, send_timeout=10))
    log.output.replace("z" * (8 * 1024 * 1024))
    log.append_text()
    log.finish({"status": "completed"})
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = bytearray()
    while chunk := await reader.read(1 << 16):
        body += chunk
        await asyncio.sleep(0.001)  # a slow reader: heartbeats are due many times over
    writer.close()
    frames = bytes(body).split(b"\r\n\r\n", 1)[1]
    # Undo chunked transfer encoding, then the SSE frames must be whole.
    payload = bytearray()
    while frames:
        size, _, rest = frames.partition(b"\r\n")
        n = int(size, 16)
        payload += rest[:n]
        frames = rest[n + 2 :]
        if n == 0:
            break
    text_frame = next(f for f in bytes(payload).split(b"\n\n") if b"event: text\n" in f)
    data = json.loads(text_frame.split(b"data: ", 1)[1])
    assert len(data["text"]) == 8 * 1024 * 1024


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(aiohttp_server: ServerFactory) -> None:
    log = TaskEventLog("t")
    server = await aiohttp_server(app_for(log, heartbeat=60, send_timeout=0.5))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    await asyncio.get_running_loop().sock_sendall(sock, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: log.subscribers == 1, "the stalled client to attach", timeout=5)
    for _ in range(64):  # 16 MiB the client never reads
        log.append(EventType.TEXT_DELTA, {"delta": "q" * (256 * 1024)})
    await wait_until(lambda: log.subscribers == 0, "the stalled client to be dropped", timeout=10)
    sock.close()
