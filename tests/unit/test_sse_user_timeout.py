"""TCP_USER_TIMEOUT on SSE connections: the first stream on a connection sets it to the send time-out, and it stays
set for the connection's later requests (the library restored it after each stream: three syscalls per task)."""

from __future__ import annotations

import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gpud.api.sseresponse import EventStreamResponse

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")

PEERS = web.AppKey("peers", list)


async def stream(request: web.Request) -> web.StreamResponse:
    response = EventStreamResponse(7.5)
    await response.prepare(request)
    await response.write(b"data: x\n\n")
    await response.write_eof()
    return response


async def probe(request: web.Request) -> web.Response:
    assert request.transport is not None
    sock = request.transport.get_extra_info("socket")
    request.app[PEERS].append(request.transport.get_extra_info("peername"))
    return web.json_response(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


async def test_the_first_stream_sets_it_and_the_connection_keeps_it(aiohttp_client: type[TestClient]) -> None:
    app = web.Application()
    app[PEERS] = []
    app.router.add_get("/stream", stream)
    app.router.add_get("/probe", probe)
    client = await aiohttp_client(app)  # type: ignore[operator]
    before = await (await client.get("/probe")).json()
    for _ in range(2):
        async with client.get("/stream") as response:
            assert await response.read() == b"data: x\n\n"
    after = await (await client.get("/probe")).json()
    assert before == 0 and after == 7500
    assert len(set(app[PEERS])) == 1, "one keep-alive connection throughout"
