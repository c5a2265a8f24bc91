"""A task on a warm session vs a bare aiohttp round trip, measured in the same run.

Run: .venv/bin/python bench/bench_session_task.py [--runtime process|podman|docker] [--tasks N]
(podman/docker need `scripts/engines.sh start` + `eval "$(scripts/engines.sh env)"` + the worker image).

gpud side: POST /api/tasks/submit with the session's id, a one-token task, read the SSE stream to task_finish
(auth, validation, queueing, the worker protocol round trip, event log, SSE). Baseline: a bare aiohttp server
answering a POST with a small JSON body, same client, same loop. Prints medians and the ratio gpud/bare.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.stack import API_KEY, close_stack, open_stack, parse_sse


async def bare_server() -> TestServer:
    async def echo(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "completed"})

    app = web.Application()
    app.router.add_post("/echo", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def time_bare(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url, json={"task_type": "session", "metadata": {"max_tokens": 1}}) as response:
        await response.read()
    return time.perf_counter() - started


async def time_task(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> float:
    started = time.perf_counter()
    async with session.post(url, json=body, headers={"X-API-Key": API_KEY}) as response:
        events = parse_sse(await response.text())
    elapsed = time.perf_counter() - started
    assert events[-1].data["status"] == "completed", events[-1].data
    return elapsed


async def main(runtime: str, tasks: int) -> None:
    stack = await open_stack(runtime)
    bare = await bare_server()
    try:
        warm = await stack.run(stack.body("session", metadata={"max_tokens": 1, "delay": 0}))
        session_id = next(e.data["session_id"] for e in warm if e.event == "connection")
        body = stack.body("session", session_id=session_id, metadata={"max_tokens": 1, "delay": 0})
        submit_url = f"{stack.url}/api/tasks/submit"
        bare_url = str(bare.make_url("/echo"))
        gpud_times, bare_times = [], []
        for _ in range(tasks):  # alternate, so machine noise hits both sides alike
            bare_times.append(await time_bare(stack.session, bare_url))
            gpud_times.append(await time_task(stack.session, submit_url, body))
        g, b = statistics.median(gpud_times), statistics.median(bare_times)
        print(f"runtime={runtime} tasks={tasks}")
        print(f"bare aiohttp round trip  median {b * 1e3:8.3f} ms")
        p90 = sorted(gpud_times)[int(tasks * 0.9)]
        print(f"warm session task        median {g * 1e3:8.3f} ms  (p90 {p90 * 1e3:.3f} ms)")
        print(f"ratio gpud/bare          {g / b:8.2f}x")
    finally:
        await bare.close()
        await close_stack(stack)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="process", choices=["process", "podman", "docker"])
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.runtime, args.tasks))
