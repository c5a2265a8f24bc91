"""A slowloris attacker, run as its own process so its work does not skew the latencies the test measures.

`python -m tests.security.slowloris PORT CONNECTIONS SECONDS` opens CONNECTIONS TCP connections to 127.0.0.1:PORT
at once; every fourth sends half a request head, the rest send nothing. Each connection waits for the server: a
`503` counts as refused (and how fast it came), an end of stream with nothing said counts as cut (by the server's
header deadline). Until SECONDS have passed, every connection that ends is opened again; then the ones still open
wait to be cut. One JSON line of counts and timings is printed at the end.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

HALF_HEAD = b"GET /health HTTP/1.1\r\nHost: victim\r\nX-Slow: "
# After a refusal, wait this long before trying again: a real attacker would not, but the test machine's two
# cores are shared with the daemon under test, and the point is holding connections, not burning CPU.
REFUSED_BACKOFF = 0.25
# A connection the server never answers nor cuts is given up after this (it would mean no header deadline).
GIVE_UP = 30.0


@dataclass
class Stats:
    """What the attacker saw."""

    opened: int = 0
    refused: int = 0
    cut: int = 0
    reset: int = 0
    connect_errors: int = 0
    never_cut: int = 0
    other: int = 0
    refuse_seconds: list[float] = field(default_factory=list)
    cut_seconds: list[float] = field(default_factory=list)
    last_cut_at: float = 0.0  # seconds after the attack started


async def _one(port: int, half: bool, started: float, stop_at: float, stats: Stats) -> None:
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats.connect_errors += 1
            await asyncio.sleep(REFUSED_BACKOFF)
            continue
        stats.opened += 1
        opened = time.monotonic()
        if half:
            writer.write(HALF_HEAD)
        try:
            async with asyncio.timeout(GIVE_UP):
                data = await reader.read(4096)
        except ConnectionResetError:
            stats.reset += 1
            data = None
        except TimeoutError:
            stats.never_cut += 1
            data = None
        waited = time.monotonic() - opened
        writer.close()
        if data is not None and data.startswith(b"HTTP/1.1 503"):
            stats.refused += 1
            stats.refuse_seconds.append(waited)
            await asyncio.sleep(REFUSED_BACKOFF)
        elif data == b"":
            stats.cut += 1
            stats.cut_seconds.append(waited)
            stats.last_cut_at = max(stats.last_cut_at, time.monotonic() - started)
        elif data is not None:
            stats.other += 1


async def attack(port: int, connections: int, seconds: float) -> Stats:
    """Hold as many connections as the server allows for `seconds`; return what happened."""
    stats = Stats()
    started = time.monotonic()
    tasks = [_one(port, i % 4 == 0, started, started + seconds, stats) for i in range(connections)]
    await asyncio.gather(*tasks)
    return stats


def main() -> None:
    """Command line: PORT CONNECTIONS SECONDS."""
    port, connections, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, connections + 256)), hard))
    print("attacking", flush=True)
    print(json.dumps(asdict(asyncio.run(attack(port, connections, seconds)))), flush=True)


if __name__ == "__main__":
    main()
