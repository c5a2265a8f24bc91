"""SSE over a real aiohttp server, read by an independent SSE client library and by a strict spec parser."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp_sse_client2 import client as sse_client

from gpud.api.sse import open_event_stream, stream_task_events
from gpud.work.events import EventType, TaskEventLog
from tests.waiting import wait_until

MULTILINE = "first line\nsecond line\r\nthird\rfourth\n\n: not a comment\ndata: not a field\n"


@dataclass
class SpecEvent:
    id: str
    type: str
    data: str


@dataclass
class StrictParser:
    """The event-stream interpretation algorithm of the HTML spec, with nothing lenient added."""

    events: list[SpecEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    last_id: str = ""
    _type: str = ""
    _data: list[str] = field(default_factory=list)
    _pending: str = ""

    def feed(self, text: str) -> None:
        self._pending += text
        lines = self._pending.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._pending = lines.pop()  # an unfinished line waits for more input
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        if line == "":
            if self._data:
                self.events.append(SpecEvent(self.last_id, self._type or "message", "\n".join(self._data)))
            self._type, self._data = "", []
            return
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name != "retry":
            raise AssertionError(f"unexpected field {name!r} in line {line!r}")


ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


def make_app(log: TaskEventLog, heartbeat: float = 15.0) -> web.Application:
    async def events(request: web.Request) -> web.StreamResponse:
        return await stream_task_events(request, log, heartbeat=heartbeat)

    async def submit(request: web.Request) -> web.StreamResponse:
        # The submit path: headers go out before any work, then the first event, then the log.
        response = await open_event_stream(request, heartbeat=heartbeat)
        log.append(EventType.CONNECTION, {"status": "gpu_allocated", "gpu_id": 0})
        return await stream_task_events(request, log, heartbeat=heartbeat, response=response, after_id=0)

    app = web.Application()
    app.router.add_get("/events", events)
    app.router.add_post("/submit", submit)
    return app


def fill(log: TaskEventLog) -> None:
    log.append(EventType.WORKER, {"status": "working", "container_id": "c1"})
    for word in ["Hello", ", ", "world", "\n", "again"]:
        log.append(EventType.TEXT_DELTA, {"delta": word})
    log.append(EventType.LOGS, {"stream": "stderr", "line": "warn: x"})
    log.append(EventType.TEXT, {"text": MULTILINE})


async def read_until(resp: aiohttp.ClientResponse, parser: StrictParser, done: Callable[[], bool], what: str) -> None:
    """Feed the parser what the server sends until done() holds (reading blocks: no polling interval)."""

    async def read_more() -> bool:
        if done():
            return True
        chunk = await resp.content.readany()
        if not chunk:
            raise AssertionError(f"the stream ended before {what}")
        parser.feed(chunk.decode())
        return done()

    await wait_until(read_more, what, timeout=5, interval=0)


async def read_to_end(resp: aiohttp.ClientResponse, parser: StrictParser) -> None:
    """Feed the parser the rest of the stream; the server must end it."""
    parser.feed((await asyncio.wait_for(resp.content.read(), 5)).decode())


async def test_independent_client_parses_ids_names_and_multiline_data(aiohttp_server: ServerFactory) -> None:
    log = TaskEventLog("task-1")
    fill(log)
    log.finish({"status": "completed", "elapsed_seconds": 1.5})
    server = await aiohttp_server(make_app(log))
    got: list[Any] = []
    async with sse_client.EventSource(str(server.make_url("/events"))) as source:
        async for message in source:
            got.append(message)
            if message.type == "task_finish":
                break
    assert [m.last_event_id for m in got] == [str(i) for i in range(1, 10)]
    assert [m.type for m in got] == [e.type.value for e in log.events()]
    datas = [json.loads(m.data) for m in got]
    assert all(d["task_id"] == "task-1" for d in datas)
    assert datas[7]["text"] == MULTILINE  # newlines, CRs, fake fields and colons survive intact
    assert "".join(d.get("delta", "") for d in datas) == "Hello, world\nagain"


async def test_strict_parser_headers_and_clean_end(aiohttp_server: ServerFactory) -> None:
    log = TaskEventLog("t")
    fill(log)
    log.finish({"status": "completed"})
    server = await aiohttp_server(make_app(log))
    async with aiohttp.ClientSession() as session, session.get(server.make_url("/events")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        body = (await resp.read()).decode()  # the server ends the response after task_finish
    parser = StrictParser()
    parser.feed(body)
    assert parser._pending == "" and not parser._data  # nothing dangling after the last blank line
    assert [e.id for e in parser.events] == [str(i) for i in range(1, 10)]
    assert [json.loads(e.data) for e in parser.events] == [e.data for e in log.events()]
    assert parser.events[-1].type == "task_finish"


async def test_resume_with_last_event_id_loses_nothing_and_duplicates_nothing(
    aiohttp_server: ServerFactory,
) -> None:
    log = TaskEventLog("t")
    server = await aiohttp_server(make_app(log))
    url = str(server.make_url("/events"))

    async def produce() -> None:
        for i in range(200):
            log.append(EventType.TEXT_DELTA, {"delta": f"{i}\n"})
            if i % 10 == 0:
                await asyncio.sleep(0.001)  # pacing, not ordering: lets the readers interleave with the writes
        log.finish({"status": "completed"})

    producer = asyncio.create_task(produce())
    first: list[Any] = []
    async with sse_client.EventSource(url) as source:
        async for message in source:
            first.append(message)
            if len(first) == 37:
                break  # the client drops the connection mid-stream
    second: list[Any] = []
    headers = {"Last-Event-ID": first[-1].last_event_id}
    async with sse_client.EventSource(url, headers=headers) as source:
        async for message in source:
            second.append(message)
            if message.type == "task_finish":
                break
    await producer
    ids = [int(m.last_event_id) for m in first + second]
    assert ids == list(range(1, 202))
    text = "".join(json.loads(m.data).get("delta", "") for m in first + second)
    assert text == "".join(f"{i}\n" for i in range(200))


async def test_query_fallback_and_invalid_id(aiohttp_server: ServerFactory) -> None:
    log = TaskEventLog("t")
    fill(log)
    log.finish({"status": "completed"})
    server = await aiohttp_server(make_app(log))
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/events"), params={"last_event_id": "7"}) as resp:
            parser = StrictParser()
            parser.feed((await resp.read()).decode())
        assert [e.id for e in parser.events] == ["8", "9"]
        async with session.get(server.make_url("/events"), headers={"Last-Event-ID": "abc"}) as resp:
            assert resp.status == 500  # InvalidRequest: the app's error middleware turns it into a 400


async def test_heartbeat_comment_on_an_idle_stream_then_live_events(aiohttp_server: ServerFactory) -> None:
    log = TaskEventLog("t")
    server = await aiohttp_server(make_app(log, heartbeat=0.05))
    parser = StrictParser()
    async with aiohttp.ClientSession() as session, session.get(server.make_url("/events")) as resp:
        await read_until(resp, parser, lambda: len(parser.comments) >= 2, "two heartbeat comments")
        assert parser.comments[:2] == ["ping", "ping"] and parser.events == []
        log.append(EventType.TEXT_DELTA, {"delta": "live"})
        await read_until(resp, parser, lambda: bool(parser.events), "the live event")
        assert json.loads(parser.events[0].data)["delta"] == "live"
        log.finish({"status": "completed"})
        await read_to_end(resp, parser)  # ends: the server closes
    assert [e.type for e in parser.events] == ["text_delta", "task_finish"]


async def test_post_submit_stream_opens_before_work(aiohttp_server: ServerFactory) -> None:
    log = TaskEventLog("t")
    server = await aiohttp_server(make_app(log))
    parser = StrictParser()
    async with aiohttp.ClientSession() as session, session.post(server.make_url("/submit")) as resp:
        assert resp.status == 200
        await read_until(resp, parser, lambda: bool(parser.events), "the first event")
        assert parser.events[0].type == "connection"
        log.finish({"status": "completed"})
        await read_to_end(resp, parser)
    assert [e.id for e in parser.events] == ["1", "2"]


async def test_client_disconnect_is_clean_and_releases_the_subscriber(
    aiohttp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    log = TaskEventLog("t")
    log.append(EventType.TEXT_DELTA, {"delta": "x"})
    server = await aiohttp_server(make_app(log, heartbeat=0.2))
    async with aiohttp.ClientSession() as session:
        resp = await session.get(server.make_url("/events"))
        await resp.content.readline()
        assert log.subscribers == 1
        resp.close()  # gone while the stream is idle
    # The handler notices within its disconnect poll (1 s) and lets go of the log.
    await wait_until(lambda: log.subscribers == 0, "the handler to release the subscriber", timeout=5)
    assert log.last_left_at is not None
    log.append(EventType.TEXT_DELTA, {"delta": "after"})
    log.finish({"status": "completed"})
    # aiohttp drops a connection from its list once the handler task is done: anything it logs is logged by then.
    await wait_until(lambda: not server.runner.server.connections, "the request handler to finish", timeout=5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
