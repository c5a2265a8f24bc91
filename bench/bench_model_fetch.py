"""Model fetch throughput: ModelStore.ensure() vs `curl -s -o` of the same URL from the same test file service.

Generates a file (default 1 GiB), serves it from tests/fileservice.py (its own process) on 127.0.0.1, and
alternates rounds of each. The store's time includes what curl does not do: sha256 of every byte, the check
against X-Content-SHA256, fsync of file and directories, the manifest and the atomic rename. For that reason a
second baseline, curl followed by an fsync of its output, is printed too. Ratio = curl time / store time
(1.0 means as fast as curl; the goal is >= 0.8). Everything generated is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit  # noqa: E402
from gpud.modelstore import ModelStore  # noqa: E402
from gpud.settings.presets import parse_size  # noqa: E402

MODEL_ID = "bench-model"
KEY = "bench-key"


def generate(path: Path, size: int) -> None:
    """Write size bytes of incompressible data (a random block repeated) quickly."""
    block = os.urandom(8 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


def start_server(path: Path) -> tuple[subprocess.Popen[str], str]:
    """Run the test file service in its own process; return it and its URL."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fileservice.py"), "--file", f"{MODEL_ID}={path}", "--key", KEY],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("URL "):
        proc.kill()
        raise SystemExit(f"file service did not start: {line!r}")
    return proc, line.split()[1]


def run_curl(url: str, out: Path, fsync: bool) -> float:
    """Time one curl download (optionally plus fsync of the output)."""
    cmd = ["curl", "-s", "-f", "-o", str(out), "-X", "POST", "-H", f"X-Internal-Key: {KEY}"]
    cmd += ["-H", "Content-Type: application/json", "-d", f'{{"model_id": "{MODEL_ID}"}}']
    t0 = time.perf_counter()
    subprocess.run([*cmd, f"{url}/api/models/download"], check=True)
    if fsync:
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elapsed = time.perf_counter() - t0
    out.unlink()
    return elapsed


async def run_store(url: str, cache: Path, size: int) -> float:
    """Time one ModelStore.ensure() of the uncached model into an empty cache."""
    store = ModelStore(cache, file_service_url=url, internal_key=KEY, auto_fetch=True)
    await store.start()
    try:
        t0 = time.perf_counter()
        path = await store.ensure(MODEL_ID)
        elapsed = time.perf_counter() - t0
        got = store.info(MODEL_ID).size_bytes
        if got != size:
            raise SystemExit(f"store fetched {got} bytes, expected {size} ({path})")
    finally:
        await store.close()
    shutil.rmtree(cache)
    return elapsed


def main() -> None:
    """Parse flags, run the rounds, print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="1g", help="payload size, e.g. 256m, 1g (default 1g)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="gpud-bench-fetch-", dir=args.dir))
    server = None
    try:
        src = work / "payload.bin"
        generate(src, size)
        server, url = start_server(src)
        times: dict[str, list[float]] = {"curl": [], "curl+fsync": [], "store": []}
        for r in range(args.rounds):
            order = ["curl", "curl+fsync", "store"] if r % 2 == 0 else ["store", "curl+fsync", "curl"]
            for name in order:
                os.sync()  # start every measurement without the previous round's writeback in flight
                if name == "store":
                    t = asyncio.run(run_store(url, work / "cache", size))
                else:
                    t = run_curl(url, work / "curl.out", fsync=name == "curl+fsync")
                times[name].append(t)
        report(times, size)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def report(times: dict[str, list[float]], size: int) -> None:
    """Print medians, throughputs and ratios."""
    mib = size / (1 << 20)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"payload: {mib:.0f} MiB, rounds: {len(times['store'])} (alternating order)")
    for name, t in med.items():
        rounds = ", ".join(f"{x:.3f}" for x in times[name])
        print(f"  {name:11s} median {t:.3f} s  ({mib / t:7.0f} MiB/s)   rounds: {rounds}")
    print(f"ratio store/curl (throughput, goal >= 0.8): {med['curl'] / med['store']:.2f}")
    print(f"ratio store/(curl+fsync):                   {med['curl+fsync'] / med['store']:.2f}")
    # Throughputs (MiB/s): the ratio gpud/curl is then the "curl time / store time".
    row = {"gpud": mib / med["store"], "baseline": mib / med["curl"], "unit": "MiB/s", "size_mib": mib}
    row["baseline_fsync"] = mib / med["curl+fsync"]
    row |= {f"{name} s": t for name, t in med.items()}
    emit("model_fetch", {"model_fetch": row})


if __name__ == "__main__":
    main()
