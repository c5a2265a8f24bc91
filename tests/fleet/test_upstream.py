"""The forwarder's connections (gpud/fleet/upstream.py) against a real aiohttp server on loopback: where an answer
ends (Content-Length, chunked in any split, empty), connections reused across answers and after a server-side
close, and a body passed through byte for byte as the server framed it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gpud.fleet.upstream import BodyEnd, UpstreamError, UpstreamPool, parse_head


def request(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def test_chunked_bodies_end_where_they_end_however_they_are_split() -> None:
    body = b"5\r\nhello\r\n1a;ext=1\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: y\r\n\r\n"
    head = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", "GET")
    for size in (1, 2, 3, 7, len(body)):
        end = BodyEnd(head)
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        results = [end.feed(piece) for piece in pieces]
        assert results[:-1] == [None] * (len(pieces) - 1) and results[-1] == len(pieces[-1]), size
    # Data that merely ends like the last chunk is not the end.
    end = BodyEnd(head)
    assert end.feed(b"4\r\nx0\r\n\r\n") is None and end.at_boundary
    assert end.feed(b"0\r\n\r\nextra") == 5
    with pytest.raises(UpstreamError):
        BodyEnd(head).feed(b"zz\r\n")


def test_heads_and_their_framing() -> None:
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3", "GET").framing == "length"
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3", "HEAD").framing == "empty"
    assert parse_head(b"HTTP/1.1 204 No Content", "DELETE").framing == "empty"
    closing = parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0", "GET")
    assert closing.framing == "length" and not closing.keep_alive
    assert parse_head(b"HTTP/1.0 200 OK", "GET").framing == "close"
    with pytest.raises(UpstreamError):
        parse_head(b"SSH-2.0-OpenSSH", "GET")


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def small(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(50):
            await response.write(b"id: %d\ndata: {}\n\n" % index)
            if index % 10 == 0:
                await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def close(request: web.Request) -> web.Response:
        return web.Response(text="bye", headers={"Connection": "close"})

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/stream", stream)
    app.router.add_get("/close", close)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def relay_all(pool: UpstreamPool, url: str, path: str) -> tuple[bytes, object]:
    upstream, head = await pool.send(url, "GET", request(path))
    received: list[bytes] = []
    assert await upstream.relay(received.append)
    pool.release(upstream)
    return b"".join(received), upstream


async def test_connections_are_reused_and_bodies_pass_through_as_framed(server: str) -> None:
    pool = UpstreamPool(connect_timeout=3.0)
    try:
        small, first = await relay_all(pool, server, "/small")
        assert small == b'{"ok": true}'
        streamed, second = await relay_all(pool, server, "/stream")
        assert second is first  # the same kept-alive connection
        assert streamed.endswith(b"0\r\n\r\n") and streamed.count(b"data: {}") == 50  # still chunk-framed
        _, third = await relay_all(pool, server, "/small")
        assert third is first
        body, closing = await relay_all(pool, server, "/close")
        assert body == b"bye"
        _, fourth = await relay_all(pool, server, "/small")
        assert fourth is not closing  # a connection the server closes is not reused
    finally:
        pool.close()


async def test_a_host_that_does_not_listen_is_an_upstream_error() -> None:
    pool = UpstreamPool(connect_timeout=1.0)
    with pytest.raises(UpstreamError):
        await pool.send("http://127.0.0.1:9", "GET", request("/"))
