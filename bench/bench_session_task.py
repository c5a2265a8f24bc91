"""A warm session through a real gpud vs a bare aiohttp server process, measured in the same run.

Run: .venv/bin/python bench/bench_session_task.py [--runtime process|podman] [--tasks N] [--deltas N]
(podman needs `scripts/engines.sh start` + `eval "$(scripts/engines.sh env)"` + the worker image).

Both servers run in processes of their own (`gpud run`; bench/bare_server.py) on loopback; one client, one
keep-alive connection per server, rounds alternating. Three measures on one warm session (bench/bench_worker.py):
- round trip: POST /api/tasks/submit with the session's id, a one-delta task, read to task_finish; baseline a bare
  JSON POST (`/echo`). Median and p99, ratio gpud/bare.
- first streamed event: from sending the POST to the first SSE event's arrival; baseline the first frame of a bare
  aiohttp SSE handler (`/sse`). Also the first text_delta (the worker's output), for the record.
- streaming: a task of N deltas (default 5000) sent as fast as the worker makes them; deltas/s from sending the
  POST to the last text_delta's arrival; baseline a bare SSE handler writing N frames, one write() each. Ratio
  gpud/bare (higher is better).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Gpud,
    bare_server,
    emit,
    first,
    median,
    percentile,
    podman_available,
    read_events,
    running_gpud,
    submit,
)


async def time_echo(session: aiohttp.ClientSession, url: str) -> float:
    """One bare JSON round trip."""
    started = time.perf_counter()
    async with session.post(f"{url}/echo", json={"task_type": "session", "metadata": {"deltas": 1}}) as response:
        await response.read()
    return time.perf_counter() - started


async def bare_stream(session: aiohttp.ClientSession, url: str, deltas: int) -> tuple[float, list[Any]]:
    """One bare SSE stream: (perf_counter at the POST, the timed events)."""
    started = time.perf_counter()
    async with session.post(f"{url}/sse", json={"deltas": deltas}) as response:
        return started, await read_events(response)


def rate(started: float, events: list[Any], deltas: int) -> float:
    """Deltas per second, from sending the request to the last text_delta's arrival (both sides pay their own
    request; arrival times are per read, so first-to-last would be 0 when one read holds every event)."""
    last = [e for e in events if e.event == "text_delta"][-1]
    return deltas / (last.at - started)


async def open_session(session: aiohttp.ClientSession, gpud: Gpud) -> str:
    """Start a session (its first task) and return its id."""
    _, events = await submit(session, gpud.url, gpud.body("session", metadata={}))
    return str(next(e.json()["session_id"] for e in events if e.event == "connection"))


async def measure(gpud: Gpud, bare: str, tasks: int, deltas: int, streams: int) -> dict[str, list[float]]:
    """Alternating rounds of each measure; the samples."""
    s: dict[str, list[float]] = {k: [] for k in ("rtt", "rtt_bare", "first", "first_bare", "token", "rate", "bare")}
    async with aiohttp.ClientSession() as gpud_http, aiohttp.ClientSession() as bare_http:
        session_id = await open_session(gpud_http, gpud)
        one = gpud.body("session", session_id=session_id, metadata={"deltas": 1})
        many = gpud.body("session", session_id=session_id, metadata={"deltas": deltas})
        for _ in range(min(20, tasks)):  # warm-up: connections, caches
            await submit(gpud_http, gpud.url, one)
            await time_echo(bare_http, bare)
        for i in range(tasks):
            if i % 2:
                s["rtt_bare"].append(await time_echo(bare_http, bare))
            started, events = await submit(gpud_http, gpud.url, one)
            s["rtt"].append(events[-1].at - started)
            s["first"].append(events[0].at - started)
            s["token"].append(first(events, "text_delta").at - started)
            if not i % 2:
                s["rtt_bare"].append(await time_echo(bare_http, bare))
            started, events = await bare_stream(bare_http, bare, 1)
            s["first_bare"].append(events[0].at - started)
        for _ in range(streams):
            started, events = await submit(gpud_http, gpud.url, many)
            s["rate"].append(rate(started, events, deltas))
            started, events = await bare_stream(bare_http, bare, deltas)
            s["bare"].append(rate(started, events, deltas))
    return s


def main() -> None:
    """Parse flags, measure, print, emit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=["process", "podman"], default=None)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--deltas", type=int, default=5000)
    parser.add_argument("--streams", type=int, default=5, help="streaming rounds of each")
    args = parser.parse_args()
    runtime = args.runtime or ("podman" if podman_available() else "process")
    with running_gpud(runtime) as gpud, bare_server() as bare:
        s = asyncio.run(measure(gpud, bare, args.tasks, args.deltas, args.streams))
    us = 1e6
    print(f"warm session, runtime={runtime}, {args.tasks} tasks alternating with the bare server")
    for name, ours, theirs in (("round trip", "rtt", "rtt_bare"), ("first event", "first", "first_bare")):
        g, b = median(s[ours]), median(s[theirs])
        print(
            f"  {name:12} gpud p50 {g * us:8.0f} us  p99 {percentile(s[ours], 99) * us:8.0f} us   "
            f"bare p50 {b * us:8.0f} us  p99 {percentile(s[theirs], 99) * us:8.0f} us   ratio {g / b:5.2f}x"
        )
    print(f"  first text_delta (the worker's output) p50 {median(s['token']) * us:8.0f} us")
    g, b = median(s["rate"]), median(s["bare"])
    print(f"  streaming {args.deltas} deltas: gpud {g:9.0f} events/s   bare SSE writer {b:9.0f} events/s   "
          f"ratio {g / b:.2f}x (median of {args.streams})")  # fmt: skip
    emit(
        "session",
        {
            "session_rtt": {"gpud": median(s["rtt"]) * us, "baseline": median(s["rtt_bare"]) * us, "unit": "us",
                            "gpud_p99": percentile(s["rtt"], 99) * us, "n": len(s["rtt"])},
            "first_event": {"gpud": median(s["first"]) * 1e3, "baseline": median(s["first_bare"]) * 1e3,
                            "unit": "ms", "first_text_delta": median(s["token"]) * 1e3},
            "streaming": {"gpud": g, "baseline": b, "unit": "events/s", "deltas": args.deltas},
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
