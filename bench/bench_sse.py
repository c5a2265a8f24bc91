"""SSE throughput: stream_task_events vs a bare aiohttp StreamResponse writing the same bytes, same run.

Run: .venv/bin/python bench/bench_sse.py [events]. Prints events/s and MB/s per writer and the ratios of gpud's
throughput to each baseline (1.0 means no overhead): `bare` writes one frame per write() (what a naive SSE
handler does), `bare-batched` joins the frames it has into one write() (the ceiling for this transport).
Scenarios: `replay-cold` (a finished log whose frames nobody has encoded yet), `replay-warm` (frames already
cached by an earlier subscriber, as a reattaching client sees), and `live` (a producer appends while the client
reads; every writer's producer does the same work: build the events in a TaskEventLog).
Server and client share one process and event loop.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit
from gpud.api.sse import format_event, stream_task_events
from gpud.work.events import EventType, TaskEventLog

ROUNDS = 3
LIVE_CHUNK = 50  # events appended per producer step in the live scenario


def make_log(n: int, *, finished: bool, warm: bool = False) -> TaskEventLog:
    log = TaskEventLog("bench", max_events=n + 10)
    if finished:
        for i in range(n):
            log.append(EventType.TEXT_DELTA, {"delta": f"token {i} "})
        log.finish({"status": "completed", "elapsed_seconds": 1.0})
    if warm:
        for event in log.events():
            format_event(event)  # as after a first subscriber: frames cached on the events
    return log


async def produce(log: TaskEventLog, n: int) -> None:
    for start in range(0, n, LIVE_CHUNK):
        for i in range(start, min(start + LIVE_CHUNK, n)):
            log.append(EventType.TEXT_DELTA, {"delta": f"token {i} "})
        await asyncio.sleep(0)
    log.finish({"status": "completed", "elapsed_seconds": 1.0})


async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/"


async def consume(url: str) -> int:
    total = 0
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        async for chunk in resp.content.iter_any():
            total += len(chunk)
    return total


async def run_gpud(n: int, scenario: str) -> tuple[float, int]:
    live = scenario == "live"
    log = make_log(n, finished=not live, warm=scenario == "replay-warm")

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_task_events(request, log, heartbeat=15.0)

    runner, url = await serve(handler)
    try:
        start = time.perf_counter()
        producer = asyncio.create_task(produce(log, n)) if live else None
        size = await consume(url)
        if producer is not None:
            await producer
        return time.perf_counter() - start, size
    finally:
        await runner.cleanup()


async def run_bare(n: int, scenario: str, batched: bool = False) -> tuple[float, int]:
    """The baseline: pre-formatted frames on a plain chunked StreamResponse, one write() each (or per batch)."""
    live = scenario == "live"
    source = make_log(n, finished=True)
    frames = [format_event(event) for event in source.events()]
    feed: asyncio.Queue[list[bytes] | None] = asyncio.Queue()
    live_log = make_log(n, finished=False)

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if not live:
            step = 512 if batched else 1
            for start in range(0, len(frames), step):
                await resp.write(b"".join(frames[start : start + step]))
        else:
            while (batch := await feed.get()) is not None:
                if batched:
                    await resp.write(b"".join(batch))
                else:
                    for frame in batch:
                        await resp.write(frame)
        await resp.write_eof()
        return resp

    async def bare_produce() -> None:
        # The same producer work as gpud's live run (events built and JSON-encoded), handing over frames.
        for start in range(0, n, LIVE_CHUNK):
            batch = []
            for i in range(start, min(start + LIVE_CHUNK, n)):
                event = live_log.append(EventType.TEXT_DELTA, {"delta": f"token {i} "})
                assert event is not None
                batch.append(format_event(event))
            feed.put_nowait(batch)
            await asyncio.sleep(0)
        end = live_log.finish({"status": "completed", "elapsed_seconds": 1.0})
        feed.put_nowait([format_event(end)])
        feed.put_nowait(None)

    runner, url = await serve(handler)
    try:
        start = time.perf_counter()
        producer = asyncio.create_task(bare_produce()) if live else None
        size = await consume(url)
        if producer is not None:
            await producer
        return time.perf_counter() - start, size
    finally:
        await runner.cleanup()


async def run_bare_batched(n: int, scenario: str) -> tuple[float, int]:
    """The strongest baseline: the same bytes joined into one write() per batch."""
    return await run_bare(n, scenario, batched=True)


RUNS: dict[str, Callable[[int, str], Awaitable[tuple[float, int]]]] = {
    "bare": run_bare,
    "bare-batched": run_bare_batched,
    "gpud": run_gpud,
}


async def main(n: int) -> None:
    print(f"SSE benchmark: {n} text_delta events per run, best of {ROUNDS}")
    rows = {}
    for scenario in ("replay-cold", "replay-warm", "live"):
        best: dict[str, tuple[float, int]] = {}
        for _ in range(ROUNDS):
            for name in RUNS:
                elapsed, size = await RUNS[name](n, scenario)
                if name not in best or elapsed < best[name][0]:
                    best[name] = (elapsed, size)
        for name in RUNS:
            elapsed, size = best[name]
            print(
                f"  {scenario:11} {name:12}: {n / elapsed:10.0f} events/s {size / elapsed / 1e6:8.1f} MB/s"
                f"  ({elapsed * 1000:.0f} ms, {size} bytes)"
            )
        for base in ("bare", "bare-batched"):
            print(f"  {scenario:11} ratio gpud/{base} throughput: {best[base][0] / best['gpud'][0]:.2f}x")
        key = "sse_" + scenario.replace("-", "_")
        rows[key] = {"gpud": n / best["gpud"][0], "baseline": n / best["bare"][0], "unit": "events/s", "events": n}
    emit("sse", rows)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000))
