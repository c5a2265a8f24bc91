"""Fleet forwarding overhead: the same request sent to the host that owns the session, and through another host
that forwards it, interleaved in one run (a real three-member etcd cluster, two real gpud hosts, process runtime).

Run: .venv/bin/python bench/bench_fleet.py [rounds]. Prints, per measure, the median direct and forwarded figures
and their ratio, then the BENCH-RESULT line bench/run reads (rows fleet_dispatch, fleet_live, fleet_replay and the
detail row fleet_get: "gpud" is the forwarded figure, "baseline" the direct one). Goals: dispatch latency
forwarded/direct <= 1.2; streaming throughput forwarded/direct >= 0.9, live and replayed.
- dispatch: POST /api/tasks/submit of a 1-token task to the session, until the first SSE event arrives
- get: GET /api/sessions/<id> (a JSON answer), whole round trip
- live stream: a 20000-token task streamed as the worker produces it (MB/s of SSE received; every 5th round)
- replay stream: the last such task's events replayed from memory (MB/s; the proxy's own ceiling; every round)
"""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import emit  # noqa: E402
from tests.fleet.etcdcluster import EtcdCluster  # noqa: E402
from tests.fleet.fleethosts import API_KEY, Fleet, session_body, session_of  # noqa: E402

HEADERS = {"X-API-Key": API_KEY}
STREAM_TOKENS = 20_000


async def first_event(client: aiohttp.ClientSession, url: str, session_id: str) -> float:
    """Seconds from sending a submission to its first SSE event; the rest of the stream is read and dropped."""
    started = time.perf_counter()
    body = session_body(session_id=session_id, max_tokens=1)
    async with client.post(url + "/api/tasks/submit", json=body, headers=HEADERS) as response:
        assert response.status == 200, await response.text()
        await response.content.readuntil(b"\n\n")
        took = time.perf_counter() - started
        await response.read()
    return took


async def get_session(client: aiohttp.ClientSession, url: str, session_id: str) -> float:
    """Seconds for GET /api/sessions/<id>."""
    started = time.perf_counter()
    async with client.get(f"{url}/api/sessions/{session_id}", headers=HEADERS) as response:
        assert response.status == 200
        await response.read()
    return time.perf_counter() - started


async def stream(client: aiohttp.ClientSession, url: str, path: str, body: object | None) -> tuple[float, str]:
    """(bytes/s of an SSE stream read whole, the task id it carried)."""
    started = time.perf_counter()
    method = "POST" if body is not None else "GET"
    size, head = 0, b""
    async with client.request(method, url + path, json=body, headers=HEADERS) as response:
        assert response.status == 200, await response.text()
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if len(head) < 200:
                head += chunk
    found = re.search(rb'"task_id":\s*"([0-9a-f]+)"', head)
    return size / (time.perf_counter() - started), found.group(1).decode() if found else ""


async def measure(owner: str, proxy: str, session_id: str, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """Each measure's direct and forwarded samples, taken alternately (direct first on even rounds)."""
    results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in ("dispatch", "get", "live", "replay")}
    async with aiohttp.ClientSession() as client:
        for warm in (owner, proxy):  # connections and caches warm on both paths
            await first_event(client, warm, session_id)
        last_task = ""
        for index in range(rounds):
            order = [(0, owner), (1, proxy)] if index % 2 == 0 else [(1, proxy), (0, owner)]
            for slot, url in order:
                results["dispatch"][slot].append(await first_event(client, url, session_id))
                results["get"][slot].append(await get_session(client, url, session_id))
            if index % 5 == 0:
                for slot, url in order:
                    body = session_body(session_id=session_id, max_tokens=STREAM_TOKENS)
                    rate, last_task = await stream(client, url, "/api/tasks/submit", body)
                    results["live"][slot].append(rate)
            for slot, url in order:  # cheap (a few ms): every round, for a steadier median
                rate, _ = await stream(client, url, f"/api/tasks/{last_task}/events", None)
                results["replay"][slot].append(rate)
    return results


def rows(results: dict[str, tuple[list[float], list[float]]]) -> dict[str, dict[str, object]]:
    """The BENCH-RESULT rows: forwarded ("gpud") against direct ("baseline"), medians, in ms or MB/s."""
    out: dict[str, dict[str, object]] = {}
    for name, (direct, forwarded) in results.items():
        d, f = statistics.median(direct), statistics.median(forwarded)
        if name in ("dispatch", "get"):
            out[f"fleet_{name}"] = {"gpud": f * 1000, "baseline": d * 1000, "unit": "ms", "samples": len(direct)}
        else:
            out[f"fleet_{name}"] = {"gpud": f / 1e6, "baseline": d / 1e6, "unit": "MB/s", "samples": len(direct)}
    return out


def report(results: dict[str, tuple[list[float], list[float]]]) -> None:
    """Medians and ratios."""
    print(f"{'measure':<10} {'direct':>14} {'forwarded':>14} {'ratio':>8}  goal")
    for name, (direct, forwarded) in results.items():
        d, f = statistics.median(direct), statistics.median(forwarded)
        if name in ("dispatch", "get"):
            goal = "<= 1.2" if name == "dispatch" else "-"
            print(f"{name:<10} {d * 1000:>11.2f} ms {f * 1000:>11.2f} ms {f / d:>8.2f}  {goal}")
        else:
            print(f"{name:<10} {d / 1e6:>9.2f} MB/s {f / 1e6:>9.2f} MB/s {f / d:>8.2f}  >= 0.9 (n={len(direct)})")


def main() -> None:
    """Start etcd and two hosts, open a session on `a`, measure a directly against b forwarding to a."""
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    base = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    etcd = EtcdCluster(base / "etcd").start()
    fleet = Fleet(etcd)
    try:
        fleet.start("a", "b")
        status, events = fleet.submit("a", session_body())
        assert status == 200, events
        session_id = session_of(events)
        owner = f"http://127.0.0.1:{fleet.daemon('a').port}"
        proxy = f"http://127.0.0.1:{fleet.daemon('b').port}"
        results = asyncio.run(measure(owner, proxy, session_id, rounds))
        print(f"fleet forwarding, {rounds} rounds, session on a, forwarded through b (loopback)")
        report(results)
        emit("fleet", rows(results))
    finally:
        fleet.close()
        etcd.stop()


if __name__ == "__main__":
    main()
