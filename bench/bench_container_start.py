"""Container start latency: gpud's podman/docker runtimes vs the plain `podman run` / `docker run` CLI.

Measures, for the Python worker image and the same hardening flags on both sides:
- create-to-running: gpud `runtime.run(spec)` (create + start) vs `<cli> run -d` (returns once started);
- create-to-exit for `true`: gpud `run` + `wait` vs a foreground `<cli> run ... true`.
Rounds alternate gpud and CLI so drift hits both; prints medians and the gpud/CLI ratio (< 1: gpud faster).

    scripts/engines.sh start && scripts/build-images.sh && .venv/bin/python bench/bench_container_start.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit  # noqa: E402
from gpud.runtime import make_runtime  # noqa: E402
from gpud.runtime.base import ContainerRuntime, ContainerSpec  # noqa: E402
from gpud.settings.presets import Limits  # noqa: E402

IMAGE = os.environ.get("GPUD_TEST_WORKER_IMAGE", "gpud-worker-python:latest")
ENGINES_DIR = os.environ.get("GPUD_ENGINES_DIR", "/tmp/gpud-engines")
SOCKETS = {
    "podman": os.environ.get("GPUD_TEST_PODMAN_SOCKET", f"{ENGINES_DIR}/podman.sock"),
    "docker": os.environ.get("GPUD_TEST_DOCKER_SOCKET", f"{ENGINES_DIR}/docker.sock"),
}
LIMITS = Limits(memory_bytes=512 * 1024**2, cpus=1.0, pids=128, shm_bytes=64 * 1024**2, tmpfs_bytes=64 * 1024**2)
HARDENING_FLAGS = [
    "--network=none", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--read-only",
    f"--tmpfs=/tmp:rw,nosuid,nodev,size={LIMITS.tmpfs_bytes},mode=1777", f"--pids-limit={LIMITS.pids}",
    f"--memory={LIMITS.memory_bytes}", f"--memory-swap={LIMITS.memory_bytes}", "--cpus=1",
    f"--shm-size={LIMITS.shm_bytes}", "--user=65534:65534",
]  # fmt: skip


def cli(engine: str) -> list[str]:
    """The plain CLI for an engine (podman runs daemonless on the same storage, as a user would run it)."""
    return ["podman"] if engine == "podman" else ["docker", "-H", f"unix://{SOCKETS['docker']}"]


def spec(bench_id: str, command: tuple[str, ...]) -> ContainerSpec:
    """gpud's hardened spec for the benchmark command."""
    labels = {"gpud.managed": "true", "gpud.bench": bench_id}
    return ContainerSpec(image=IMAGE, command=command, labels=labels, limits=LIMITS)


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    """Seconds the action took."""
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def run_cli(argv: list[str]) -> None:
    """Run a CLI command to completion; fail loudly if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed: {err.decode().strip()}")


async def one_round(engine: str, rt: ContainerRuntime, bench_id: str, samples: dict[str, list[float]]) -> None:
    """One measurement of each of the four (gpud/CLI x running/exit), in alternating order."""
    label = ["--label", f"gpud.bench={bench_id}"]
    base = [*cli(engine), "run", *label, *HARDENING_FLAGS]
    samples["gpud running"].append(await timed(lambda: rt.run(spec(bench_id, ("sleep", "30")))))
    samples["cli running"].append(await timed(lambda: run_cli([*base, "-d", IMAGE, "sleep", "30"])))

    async def gpud_exit() -> None:
        await rt.wait(await rt.run(spec(bench_id, ("true",))))

    samples["cli exit"].append(await timed(lambda: run_cli([*base, IMAGE, "true"])))
    samples["gpud exit"].append(await timed(gpud_exit))
    for info in await rt.list({"gpud.bench": bench_id}):  # untimed cleanup keeps the engine's state flat
        await rt.remove(info.id)


async def bench_engine(engine: str, rounds: int) -> dict[str, float] | None:
    """Medians for one engine, or None when it is not running."""
    rt = make_runtime(engine, SOCKETS[engine])
    try:
        if not (await rt.health()).ok:
            print(f"{engine}: not running at {SOCKETS[engine]} (scripts/engines.sh start); skipped")
            return None
        await rt.ensure_image(IMAGE)
        bench_id = uuid.uuid4().hex[:10]
        samples: dict[str, list[float]] = {k: [] for k in ("gpud running", "cli running", "gpud exit", "cli exit")}
        await one_round(engine, rt, bench_id, {k: [] for k in samples})  # warm-up, discarded
        for _ in range(rounds):
            await one_round(engine, rt, bench_id, samples)
        return {k: statistics.median(v) for k, v in samples.items()}
    finally:
        await rt.close()


def report(engine: str, medians: dict[str, float], rounds: int) -> None:
    """Print medians (ms) and gpud/CLI ratios."""
    for what in ("running", "exit"):
        ours, theirs = medians[f"gpud {what}"], medians[f"cli {what}"]
        label = "create-to-running" if what == "running" else "create-to-exit (true)"
        print(
            f"{engine:6} {label:22} gpud {ours * 1000:7.1f} ms   {engine} run {theirs * 1000:7.1f} ms   "
            f"ratio gpud/cli {ours / theirs:5.2f}   (median of {rounds})"
        )


async def main() -> None:
    """Benchmark each running engine."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--engines", default="podman,docker", help="comma-separated (default podman,docker)")
    args = parser.parse_args()
    os.environ.setdefault("CONTAINERS_CONF", str(REPO / "tests/engines/containers.conf"))
    rows = {}
    for engine in args.engines.split(","):
        medians = await bench_engine(engine, args.rounds)
        if medians is not None:
            report(engine, medians, args.rounds)
            for what in ("running", "exit"):
                rows[f"container_{what}_{engine}"] = {
                    "gpud": medians[f"gpud {what}"], "baseline": medians[f"cli {what}"], "unit": "s"
                }  # fmt: skip
    emit("container_start", rows)


if __name__ == "__main__":
    asyncio.run(main())
