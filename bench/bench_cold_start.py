"""Session cold start: the first task of a new session through gpud vs starting the same worker container directly
until it reports `ready` over the worker protocol.

Run: .venv/bin/python bench/bench_cold_start.py [--runtime podman|process] [--rounds N]

gpud side: `gpud run` in its own process; POST /api/tasks/submit of a session task without a session id (a new
session: lease, socket directory, container, hello, ready, then the task's one delta) read to task_finish; the
session is then killed (untimed). Baseline: what gpud asks of the engine, done by hand: a socket directory handed
to a worker uid with a listening socket (gpud.worker.socketdir.bind_fresh), then `podman --url ... run -d` of the
same image and command (bench/bench_worker.py) with the same hardening flags, mounts (socket directory, SDK,
model) and environment, timed until the worker's `ready` line arrives on the socket; the container is removed
untimed. With the process runtime the worker command runs directly. Rounds alternate.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_oneoff import HARDENING
from bench.common import (
    API_KEY,
    IMAGE,
    MODEL_ID,
    WORKER_SOURCE,
    Gpud,
    emit,
    first,
    median,
    percentile,
    podman_cli,
    running_gpud,
    runtime_args,
    submit,
)
from gpud.worker import sdk_source_path
from gpud.worker.socketdir import bind_fresh

WORKER_UID = 2_000_065_000  # the uid in HARDENING's --user


class Direct:
    """Starts the worker container by hand and waits for its `ready` (the baseline)."""

    def __init__(self, runtime: str, base: Path) -> None:
        self.runtime = runtime
        self.base = base
        self.sdk = base / "direct-sdk"
        self.sdk.mkdir(mode=0o755)
        shutil.copyfile(sdk_source_path(), self.sdk / "gpud_worker.py")
        (self.sdk / "gpud_worker.py").chmod(0o644)
        self.rounds = 0

    async def start_until_ready(self) -> float:
        """Seconds from the start command to the worker's `ready`; the container is removed afterwards."""
        self.rounds += 1
        sock_dir = self.base / f"d{self.rounds}"
        uid = WORKER_UID if self.runtime == "podman" else os.geteuid()
        sock = bind_fresh(sock_dir, uid, uid)
        ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                if json.loads(line).get("type") == "ready" and not ready.done():
                    ready.set_result(time.perf_counter())
                    writer.write(b'{"type": "shutdown", "reason": "benchmark round over"}\n')
            writer.close()

        server = await asyncio.start_unix_server(on_connect, sock=sock)
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*self.command(sock_dir), stdout=subprocess.PIPE)
        try:
            stamp = await asyncio.wait_for(ready, 60)
        finally:
            server.close()
            await self.cleanup(proc)
            shutil.rmtree(sock_dir, ignore_errors=True)
        return stamp - started

    def command(self, sock_dir: Path) -> list[str]:
        """The start command: the CLI's `run -d`, or the worker itself for the process runtime."""
        env = {"PYTHONPATH": "/opt/gpud/lib", "GPUD_WORKER_SOCKET": "/run/gpud-worker/worker.sock"}
        env |= {"MODEL_PATH": "/models", "GPUD_WORKER_RECONNECT_SECONDS": "0"}
        if self.runtime == "process":
            env |= {"PYTHONPATH": str(self.sdk), "GPUD_WORKER_SOCKET": str(sock_dir / "worker.sock")}
            return ["env", *(f"{k}={v}" for k, v in env.items()), "python3", "-c", WORKER_SOURCE]
        mounts = [f"{sock_dir}:/run/gpud-worker:rw", f"{self.sdk}:/opt/gpud/lib:ro"]
        mounts.append(f"{self.base / 'models' / MODEL_ID}:/models:ro")
        return [
            *podman_cli(), "run", "-d", *HARDENING, "--label", "gpud.bench=cold-start",
            *(f"--volume={m}" for m in mounts), *(f"--env={k}={v}" for k, v in env.items()),
            IMAGE, "python3", "-c", WORKER_SOURCE,
        ]  # fmt: skip

    async def cleanup(self, proc: asyncio.subprocess.Process) -> None:
        """Remove the container (or end the process)."""
        out, _ = await proc.communicate() if self.runtime == "podman" else (b"", None)
        if self.runtime == "process":
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
            return
        container = out.decode().strip()
        for _ in range(5 if container else 0):
            # The worker exits on `shutdown` just as it is removed: libpod 4.3 may then refuse ("state improper").
            rm = await asyncio.create_subprocess_exec(*podman_cli(), "rm", "-f", "-t", "0", container,
                                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            if await rm.wait() == 0:
                return
            await asyncio.sleep(0.2)
        if container:
            print(f"warning: could not remove the baseline container {container[:12]}", file=sys.stderr)


async def gpud_cold_start(session: aiohttp.ClientSession, gpud: Gpud) -> tuple[float, float]:
    """(submit -> task_finish, submit -> session_ready) of a new session's first task; then the session is killed."""
    started, events = await submit(session, gpud.url, gpud.body("session", metadata={}))
    ready = first(events, "connection")
    session_id = ready.json()["session_id"]
    async with session.delete(f"{gpud.url}/api/sessions/{session_id}", headers={"X-API-Key": API_KEY}) as response:
        await response.read()  # returns once the container is gone
    return events[-1].at - started, ready.at - started


async def measure(runtime: str, rounds: int) -> dict[str, list[float]]:
    """Alternating rounds after one warm-up of each."""
    samples: dict[str, list[float]] = {"gpud": [], "ready": [], "direct": []}
    with running_gpud(runtime) as gpud:
        direct = Direct(runtime, gpud.base)
        async with aiohttp.ClientSession() as session:
            await gpud_cold_start(session, gpud)
            await direct.start_until_ready()
            for i in range(rounds):
                if i % 2:
                    samples["direct"].append(await direct.start_until_ready())
                total, ready = await gpud_cold_start(session, gpud)
                samples["gpud"].append(total)
                samples["ready"].append(ready)
                if not i % 2:
                    samples["direct"].append(await direct.start_until_ready())
    return samples


def main() -> None:
    """Parse flags, measure, print, emit."""
    args = runtime_args(__doc__.splitlines()[0], rounds=9)
    runtime = args.runtime
    s = asyncio.run(measure(runtime, args.rounds))
    g, b = median(s["gpud"]), median(s["direct"])
    what = "podman run -d until ready" if runtime == "podman" else "the worker run directly until ready"
    print(f"session cold start, runtime={runtime}, {args.rounds} rounds alternating")
    p90 = percentile(s["gpud"], 90)
    print(f"  gpud first task (submit -> task_finish) median {g * 1000:7.1f} ms  p90 {p90 * 1000:7.1f} ms")
    print(f"  gpud submit -> session_ready event      median {median(s['ready']) * 1000:7.1f} ms")
    print(f"  {what:39} median {b * 1000:7.1f} ms  p90 {percentile(s['direct'], 90) * 1000:7.1f} ms")
    print(f"  ratio gpud/direct {g / b:.2f}x")
    row = {"gpud": g, "baseline": b, "unit": "s", "gpud_ready": median(s["ready"]), "baseline_name": what}
    emit("cold_start", {"cold_start": row})


if __name__ == "__main__":
    main()
