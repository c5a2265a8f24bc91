"""SSE streams keep timers off the per-event path (a timeout per write and per wait was a fifth of gpud's time with
200 clients) without losing what the timers are for: a write that can block still has its send timeout (the
stalled-client tests in test_sse_bounds and tests/security), an idle stream still looks for a vanished client,
and a real cancellation is never mistaken for the stream's own timer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gpud.api import sse
from gpud.work.events import EventType, TaskEventLog

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


def app_for(log: TaskEventLog) -> web.Application:
    async def events(request: web.Request) -> web.StreamResponse:
        return await sse.stream_task_events(request, log, heartbeat=30, send_timeout=5)

    app = web.Application()
    app.router.add_get("/events", events)
    return app


@contextlib.contextmanager
def counting_timeouts(monkeypatch: pytest.MonkeyPatch) -> Any:
    armed: list[float | None] = []
    original = asyncio.timeout

    def timeout(delay: float | None) -> Any:
        armed.append(delay)
        return original(delay)

    monkeypatch.setattr(asyncio, "timeout", timeout)
    yield armed


async def test_live_events_to_a_reading_client_arm_no_timeout_per_write_or_wait(
    aiohttp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = TaskEventLog("t")
    server = await aiohttp_server(app_for(log))
    stream_timers: list[object] = []
    loop = asyncio.get_running_loop()
    call_at = loop.call_at

    def spying_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__name__", "") == "_on_timer":
            stream_timers.append(callback)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", spying_call_at)
    with counting_timeouts(monkeypatch) as armed:
        async with aiohttp.ClientSession() as session, session.get(server.make_url("/events")) as response:
            for n in range(300):  # one at a time, each written and waited for on its own
                log.append(EventType.TEXT_DELTA, {"delta": f"{n},"})
                await asyncio.sleep(0)
            log.finish({"status": "completed"})
            body = await response.read()
    assert body.count(b"event: text_delta") == 300 and b"event: task_finish" in body
    assert armed.count(5) <= 1, armed  # the stream's send timeout: at most for the end (write_eof), once
    assert len(stream_timers) <= 2, stream_timers  # one wait timer per stream, re-armed about once a second


def make_stream() -> tuple[sse._Stream, TaskEventLog]:
    """A stream of the calling task (its own timer interrupts that task), with no connection behind it."""
    log = TaskEventLog("t")
    request = SimpleNamespace(transport=None)
    return sse._Stream(request, None, log, heartbeat=30, send_timeout=5), log  # type: ignore[arg-type]


async def test_the_wait_timer_ends_a_wait_and_events_end_it_sooner() -> None:
    s, log = make_stream()
    with log.attach() as sub:
        loop = asyncio.get_running_loop()
        assert await s._wait_until(sub, loop.time() + 0.05) is True  # nothing came: the timer ended it
        loop.call_later(0.05, log.append, EventType.TEXT_DELTA, {"delta": "x"})
        assert await asyncio.wait_for(s._wait_until(sub, loop.time() + 30), 5) is False  # an event ended it


async def test_a_real_cancellation_is_not_taken_for_the_timer() -> None:
    async def wait() -> bool:
        s, log = make_stream()
        with log.attach() as sub:
            return await s._wait_until(sub, asyncio.get_running_loop().time() + 30)

    waiting = asyncio.ensure_future(wait())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_cancellation_at_the_timer_s_moment_still_cancels() -> None:
    async def wait() -> bool:
        s, log = make_stream()
        with log.attach() as sub:
            loop = asyncio.get_running_loop()
            current = asyncio.current_task()
            assert current is not None
            loop.call_at(loop.time() + 0.05, current.cancel)  # scheduled before the stream's own timer, same time
            return await s._wait_until(sub, loop.time() + 0.05)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(wait(), 5)
