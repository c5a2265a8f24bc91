"""Fan-in: many concurrent SSE clients streaming from sessions on 2 GPUs; how long a worker's output takes to reach
each client (p50/p99), and the daemon's resident memory meanwhile.

Run: .venv/bin/python bench/bench_fanin.py [--runtime podman|process] [--clients 200] [--seconds 5]

Two sessions are opened (one per GPU: `low` and `high`; a GPU holds one session). Each gets one task of the
benchmark worker (bench/bench_worker.py, inline in the preset: no image rebuild) that, from an agreed start time,
writes `time.time()` as a delta every --interval seconds. The two submitting streams are clients; the others attach
to the two tasks (GET /api/tasks/{id}/events), half each, all before the start. Each client notes, per delta, its
arrival time minus the time written in it: the worker's write to the client's read, through the worker's socket,
gpud's event log and SSE. gpud's RSS (tests/security/procstat.py) is sampled every 50 ms. The goals are absolute
(p99 under 50 ms and RSS under 200 MB with 200 clients); for context the same clients also read a bare aiohttp
fan-out (bench/bare_server.py /fan: stamps made in the server itself, one queue per client), alternating with
gpud: what this machine and this client process allow. CPU use of server and client is printed for each run.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    API_KEY,
    Gpud,
    bare_server,
    cpu_seconds,
    emit,
    median,
    percentile,
    podman_available,
    running_gpud,
    submit,
)
from tests.security.procstat import rss_bytes

STAMP = re.compile(rb'"delta":\s*"(\d+\.\d+)')


class Client:
    """One SSE reader: latency (s) of every stamped delta it receives."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.latencies: list[float] = []
        self.connected = asyncio.Event()
        self.finished = False

    async def read(self, response: aiohttp.ClientResponse) -> None:
        """Read the stream to its end, timing each stamped delta as its chunk arrives."""
        pending = b""
        async for chunk in response.content.iter_any():
            now = time.time()
            self.connected.set()
            pending += chunk
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            whole, pending = pending[: cut + 2], pending[cut + 2 :]
            self.latencies.extend(now - float(m) for m in STAMP.findall(whole))
            if b"event: task_finish" in whole:
                self.finished = True
                return


async def submitting(http: aiohttp.ClientSession, gpud: Gpud, body: dict, client: Client, ids: asyncio.Queue) -> None:
    """Submit a task and read its stream as a client; put its task id on `ids` once the first event names it."""
    async with http.post(f"{gpud.url}/api/tasks/submit", json=body, headers={"X-API-Key": API_KEY}) as response:
        if response.status != 200:
            raise SystemExit(f"submit failed: {response.status} {await response.text()}")
        line = b""
        while b"task_id" not in line:  # the first frame carries the task id
            line = await response.content.readline()
        ids.put_nowait(re.search(rb'"task_id":\s*"([0-9a-f]+)"', line).group(1).decode())  # type: ignore[union-attr]
        await client.read(response)


async def attaching(http: aiohttp.ClientSession, gpud: Gpud, task_id: str, client: Client) -> None:
    """Attach to a running task's events and read them as a client."""
    url = f"{gpud.url}/api/tasks/{task_id}/events"
    async with http.get(url, headers={"X-API-Key": API_KEY}) as response:
        if response.status != 200:
            raise SystemExit(f"attach failed: {response.status} {await response.text()}")
        await client.read(response)


async def sample_rss(pid: int, stop: asyncio.Event, samples: list[int]) -> None:
    """The server's RSS every 50 ms until stop."""
    while not stop.is_set():
        samples.append(rss_bytes(pid))
        await asyncio.sleep(0.05)


@dataclass
class Run:
    """One fan-in run's figures."""

    latencies: list[float]
    expected: int
    finished: int
    rss_idle: int
    rss_max: int
    late: float  # how long after the start the last client attached (> 0: the first deltas were replayed)
    server_cpu: float  # CPU seconds of the server while streaming
    client_cpu: float  # CPU seconds of this (client) process meanwhile
    wall: float


async def stream_all(pid: int, clients: list[Client], runs: list[asyncio.Task[None]], start_at: float) -> Run:
    """Wait for every client to attach, then for the streams to end; sample the server meanwhile."""
    await asyncio.gather(*(c.connected.wait() for c in clients))
    late = time.time() - start_at
    stop, rss = asyncio.Event(), [rss_bytes(pid)]
    sampler = asyncio.create_task(sample_rss(pid, stop, rss))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    before = (cpu_seconds(pid), time.process_time(), time.perf_counter())
    await asyncio.gather(*runs)
    server_cpu, client_cpu, wall = (
        cpu_seconds(pid) - before[0],
        time.process_time() - before[1],
        time.perf_counter() - before[2],
    )
    stop.set()
    await sampler
    latencies = [x for c in clients for x in c.latencies]
    expected = sum(c.expected for c in clients)
    finished = sum(c.finished for c in clients)
    return Run(latencies, expected, finished, rss[0], max(rss), late, server_cpu, client_cpu, wall)


def http_client() -> aiohttp.ClientSession:
    """A client session without a connection limit or a total timeout."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None))


async def measure_gpud(gpud: Gpud, clients: int, deltas: int, interval: float) -> Run:
    """Open two sessions, start the two stamped tasks, attach the clients, collect latencies and RSS."""
    async with http_client() as http:
        sessions = []
        for difficulty in ("low", "high"):  # one session per GPU, warm
            _, events = await submit(http, gpud.url, gpud.body("session", task_difficulty=difficulty, metadata={}))
            sessions.append(next(e.json()["session_id"] for e in events if e.event == "connection"))
        start_at = time.time() + lead(clients)
        meta = {"deltas": deltas, "interval": interval, "stamp": True, "start_at": start_at}
        everyone = [Client(deltas) for _ in range(clients)]
        ids: asyncio.Queue[str] = asyncio.Queue()
        runs = []
        for i, session_id in enumerate(sessions):
            body = gpud.body("session", session_id=session_id, metadata=meta)
            runs.append(asyncio.create_task(submitting(http, gpud, body, everyone[i], ids)))
        task_ids = [await ids.get(), await ids.get()]
        for i, client in enumerate(everyone[2:]):
            runs.append(asyncio.create_task(attaching(http, gpud, task_ids[i % 2], client)))
        return await stream_all(gpud.pid, everyone, runs, start_at)


async def measure_bare(url: str, pid: int, clients: int, deltas: int, interval: float) -> Run:
    """The same clients on a bare aiohttp fan-out (bench/bare_server.py /fan), two groups as two tasks."""
    async with http_client() as http:
        start_at = time.time() + lead(clients)
        everyone = [Client(deltas) for _ in range(clients)]
        tag = f"{time.time_ns()}"

        async def subscribe(client: Client, group: int) -> None:
            query = f"group={tag}-{group}&deltas={deltas}&interval={interval}&start_at={start_at}"
            async with http.get(f"{url}/fan?{query}") as response:
                await client.read(response)

        runs = [asyncio.create_task(subscribe(client, i % 2)) for i, client in enumerate(everyone)]
        return await stream_all(pid, everyone, runs, start_at)


def lead(clients: int) -> float:
    """Seconds from now to the first delta: time for every client to attach."""
    return 1.0 + clients * 0.01


def report(name: str, run: Run) -> None:
    """Print one run's figures."""
    lat, mb = run.latencies, 1024 * 1024
    print(f"  {name}: deltas received {len(lat)} of {run.expected}; streams that ended properly {run.finished}")
    if run.late > 0:
        print(f"    warning: the last client attached {run.late * 1000:.0f} ms after the start (replayed deltas)")
    print(f"    write -> client read: p50 {median(lat) * 1000:6.1f} ms  p99 {percentile(lat, 99) * 1000:6.1f} ms"
          f"  max {max(lat, default=0) * 1000:6.1f} ms")  # fmt: skip
    print(f"    CPU while streaming ({run.wall:.1f} s): server {run.server_cpu:.2f} s ({run.server_cpu / run.wall:.0%}"
          f" of a core), client process {run.client_cpu:.2f} s ({run.client_cpu / run.wall:.0%})")  # fmt: skip
    print(f"    server RSS: before {run.rss_idle / mb:6.1f} MB, max while streaming {run.rss_max / mb:6.1f} MB")


def main() -> None:
    """Parse flags, measure (gpud and the bare fan-out alternating), print, emit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=["podman", "process"], default=None)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each worker streams")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between a worker's deltas")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each (alternating)")
    args = parser.parse_args()
    runtime = args.runtime or ("podman" if podman_available() else "process")
    deltas = max(1, round(args.seconds / args.interval))
    ours: list[Run] = []
    theirs: list[Run] = []
    env = {"GPUD_MAX_CONNECTIONS": str(args.clients + 64)}
    with running_gpud(runtime, env) as gpud, bare_server(with_pid=True) as (bare, bare_pid):
        for i in range(args.rounds):
            if i % 2:
                theirs.append(asyncio.run(measure_bare(bare, bare_pid, args.clients, deltas, args.interval)))
            ours.append(asyncio.run(measure_gpud(gpud, args.clients, deltas, args.interval)))
            if not i % 2:
                theirs.append(asyncio.run(measure_bare(bare, bare_pid, args.clients, deltas, args.interval)))
    print(f"fan-in, runtime={runtime}: {args.clients} clients on 2 streams, {deltas} deltas each every "
          f"{args.interval * 1000:.0f} ms, {args.rounds} round(s) of each")  # fmt: skip
    for i, (g, b) in enumerate(zip(ours, theirs, strict=True)):
        report(f"gpud (2 sessions) #{i + 1}", g)
        report(f"bare aiohttp fan-out #{i + 1}", b)
    lat = [x for r in ours for x in r.latencies]
    base = [x for r in theirs for x in r.latencies]
    p99, b99, mb = percentile(lat, 99) * 1000, percentile(base, 99) * 1000, 1024 * 1024
    print(
        f"  p99 gpud {p99:.1f} ms, bare fan-out {b99:.1f} ms; gpud RSS max {max(r.rss_max for r in ours) / mb:.1f} MB"
    )
    emit(
        "fanin",
        {
            "fanin_p99": {"gpud": p99, "baseline": b99, "unit": "ms", "p50": median(lat) * 1000,
                          "clients": args.clients, "received": len(lat), "expected": sum(r.expected for r in ours),
                          "gpud_cpu_share": sum(r.server_cpu for r in ours) / sum(r.wall for r in ours),
                          "client_cpu_share": sum(r.client_cpu for r in ours) / sum(r.wall for r in ours)},
            "fanin_rss": {"gpud": max(r.rss_max for r in ours) / mb, "unit": "MB",
                          "idle": ours[0].rss_idle / mb},
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
