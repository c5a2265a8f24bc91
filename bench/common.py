"""What the benchmarks share: a real gpud process to measure, a bare aiohttp server process to compare with, an SSE
reader that times every event, the engine CLI, statistics, and the machine-readable result line `bench/run` reads.

Every benchmark prints its human report and, last, one line `BENCH-RESULT {json}`: {"bench": name, "rows": {key:
{"gpud": number, "baseline": number, "unit": "s"|"ms"|"us"|"events/s"|"MiB/s"|"MB", ...}}} (see bench/run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.daemonproc import DaemonProcess  # noqa: E402

RESULT_PREFIX = "BENCH-RESULT "
API_KEY = "bench-key"
MODEL_ID = "bench-model"
IMAGE = os.environ.get("GPUD_TEST_WORKER_IMAGE", "gpud-worker-python:latest")
ENGINES_DIR = os.environ.get("GPUD_ENGINES_DIR", "/tmp/gpud-engines")
PODMAN_SOCKET = os.environ.get("GPUD_TEST_PODMAN_SOCKET", f"{ENGINES_DIR}/podman.sock")
# The one-off task of the benchmarks: a trivial Python command, the same on gpud and on the CLI.
ONEOFF_COMMAND = ["python3", "-c", "print('hello from a one-off')"]
WORKER_SOURCE = (Path(__file__).with_name("bench_worker.py")).read_text()
LIMITS = {"memory": "512m", "cpus": 1, "pids": 128, "shm_size": "64m", "tmpfs_size": "64m"}


def emit(bench: str, rows: dict[str, dict[str, Any]]) -> None:
    """Print the machine-readable result line (the last line a benchmark prints)."""
    print(RESULT_PREFIX + json.dumps({"bench": bench, "rows": rows}), flush=True)


def median(values: Sequence[float]) -> float:
    """The median (0 for no values)."""
    return statistics.median(values) if values else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def podman_available() -> bool:
    """Whether the private Podman engine's API socket is there (scripts/engines.sh start)."""
    return os.path.exists(PODMAN_SOCKET) and shutil.which("podman") is not None


def runtime_args(description: str, rounds: int) -> argparse.Namespace:
    """The flags of a benchmark that runs gpud on a runtime: --runtime (default: podman when its engine is there,
    else process) and --rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runtime", choices=["podman", "process"], default=None)
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    args.runtime = args.runtime or ("podman" if podman_available() else "process")
    return args


def podman_cli() -> list[str]:
    """The podman CLI talking to the same engine gpud uses (remote, over its API socket)."""
    return ["podman", "--url", f"unix://{PODMAN_SOCKET}"]


def engine_versions() -> dict[str, str]:
    """Versions for the report: podman (client and the engine gpud talks to), docker, python, kernel."""
    out: dict[str, str] = {"python": sys.version.split()[0], "kernel": os.uname().release}
    if podman_available():
        proc = subprocess.run([*podman_cli(), "version", "--format", "{{.Server.Version}}"], capture_output=True)
        out["podman"] = proc.stdout.decode().strip() or "?"
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- a real gpud -----------------------------------------------------------------------------------------------


def presets() -> dict[str, Any]:
    """The benchmark presets: a trivial one-off command and the inline benchmark session worker."""
    common = {"docker_image": IMAGE, "limits": LIMITS}
    return {
        "models": {
            MODEL_ID: {
                "oneoff": {**common, "command": ONEOFF_COMMAND, "mode": "oneoff"},
                "session": {
                    **common,
                    "command": ["python3", "-c", WORKER_SOURCE],
                    "mode": "session",
                    "readiness_timeout_seconds": 60,
                },
            }
        }
    }


@dataclass
class Gpud:
    """A `gpud run` process on static GPUs 0:low,1:high with the benchmark presets and a cached model."""

    runtime: str
    base: Path
    daemon: DaemonProcess
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The public API's base URL."""
        return f"http://127.0.0.1:{self.daemon.port}"

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    @property
    def log(self) -> str:
        """What gpud wrote to stderr so far."""
        return self.daemon.log

    def body(self, task_type: str, **fields: Any) -> dict[str, Any]:
        """A submission for the benchmark model."""
        preset = "oneoff" if task_type == "oneoff" else "session"
        return {"task_type": task_type, "model_id": MODEL_ID, "task_preset": preset, **fields}


def bench_base() -> Path:
    """A short, world-traversable directory (AF_UNIX path limits; workers run as their own uids), not under
    /tmp (the process runtime maps a worker's /tmp to a private one)."""
    base = Path(tempfile.mkdtemp(prefix="gpud-bench-", dir="/var/tmp"))
    base.chmod(0o755)
    model = base / "models" / MODEL_ID
    model.mkdir(parents=True)
    (model / "tokens.txt").write_text("alpha beta gamma\n")
    for path in (base / "models", model):
        path.chmod(0o755)
    (model / "tokens.txt").chmod(0o644)
    return base


@contextmanager
def running_gpud(runtime: str, env: dict[str, str] | None = None) -> Iterator[Gpud]:
    """Start gpud (waits for READY=1), yield it, stop it and remove its files."""
    base = bench_base()
    (base / "models.json").write_text(json.dumps(presets()))
    environ = {
        "GPUD_RUNTIME": runtime,
        "GPUD_RUNTIME_SOCKET": PODMAN_SOCKET if runtime == "podman" else "",
        "GPUD_STATE_DIR": str(base / "state"),
        "MODEL_CACHE_DIR": str(base / "models"),
        "AUTO_FETCH_MODELS": "false",
        "GPUD_PRESETS_FILE": str(base / "models.json"),
        "ALLOWED_DOCKER_IMAGES": "gpud-worker-python:*,localhost/gpud-worker-python:*",
        "INTERNAL_API_KEY": API_KEY,
        "GPUD_WORKER_RECONNECT_SECONDS": "0",
        **(env or {}),
    }
    daemon = DaemonProcess(base, env=environ)
    try:
        daemon.start()
        yield Gpud(runtime, base, daemon, environ)
    finally:
        daemon.kill()
        shutil.rmtree(base, ignore_errors=True)


# --- a bare aiohttp server, the baseline -----------------------------------------------------------------------


@contextmanager
def bare_server(with_pid: bool = False) -> Iterator[Any]:
    """bench/bare_server.py in its own process (as gpud is); yields its base URL (and its pid, if asked)."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("bare_server.py"))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("URL "):
            raise SystemExit(f"bare server did not start: {line!r}")
        yield (line.split()[1], proc.pid) if with_pid else line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


# --- reading SSE with a time for every event -------------------------------------------------------------------


@dataclass
class Timed:
    """One SSE event as it arrived: perf_counter and wall-clock times, its name and raw data."""

    at: float
    wall: float
    event: str
    data: bytes

    def json(self) -> dict[str, Any]:
        """The event's data, parsed."""
        return dict(json.loads(self.data))


async def read_events(response: aiohttp.ClientResponse, stop_at: str = "task_finish") -> list[Timed]:
    """Every event of an SSE response, timed as its chunk arrived, up to and including `stop_at`; the rest of the
    response is read to its end (so the keep-alive connection is reused, as the baselines' are)."""
    events: list[Timed] = []
    pending = b""
    async for chunk in response.content.iter_any():
        if events and events[-1].event == stop_at:
            continue  # only the end of the chunked body is left
        now, wall = time.perf_counter(), time.time()
        pending += chunk
        *frames, pending = pending.split(b"\n\n")
        for frame in frames:
            name, data = b"", b""
            for line in frame.split(b"\n"):
                if line.startswith(b"event:"):
                    name = line[6:].strip()
                elif line.startswith(b"data:"):
                    data = line[5:].strip()
            if data and not (events and events[-1].event == stop_at):
                events.append(Timed(now, wall, name.decode(), data))
    return events


async def submit(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[float, list[Timed]]:
    """POST a task and read its stream to task_finish; (perf_counter at the start, the timed events)."""
    started = time.perf_counter()
    async with session.post(f"{url}/api/tasks/submit", json=body, headers={"X-API-Key": API_KEY}) as response:
        if response.status != 200:
            raise SystemExit(f"submit failed: {response.status} {await response.text()}")
        events = await read_events(response)
    finish = events[-1].json() if events else {}
    if finish.get("status") != "completed":
        raise SystemExit(f"task did not complete: {finish}")
    return started, events


def first(events: Sequence[Timed], name: str) -> Timed:
    """The first event of that name."""
    return next(e for e in events if e.event == name)
