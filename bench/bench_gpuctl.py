"""gpuctl start-up + one admin request, against `podman ps --format json` on the same machine, in the same run.

Run: .venv/bin/python bench/bench_gpuctl.py [rounds] [--importtime]

Starts a real gpud (process runtime) with two live sessions, then alternates `gpuctl sessions ls -o json` (the
installed console script, a real subprocess over the admin socket) with `podman ps --format json` (through the
scripts/engines.sh API socket when it runs, else plain rootful podman), `rounds` times each (default 30), and prints
both medians and their ratio (gpuctl / podman; below 1.0 means gpuctl is faster). With --importtime it also prints
the slowest imports of `gpuctl.cli` (python -X importtime, cumulative microseconds).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import emit  # noqa: E402
from tests.integration.gpuctl_env import MODEL_ID, gpuctl_command, gpuctl_env, run_gpuctl, start_host  # noqa: E402

# Python start-up floors printed next to the result (each prints JSON so `timed` can check it).
FLOORS = (
    ("python (venv, site)", [sys.executable, "-c", "print('{}')"]),
    ("python + import click", [sys.executable, "-c", "import click; print('{}')"]),
)
ENGINE_SOCKET = Path(os.environ.get("GPUD_ENGINES_DIR", "/tmp/gpud-engines")) / "podman.sock"


def podman_command() -> list[str] | None:
    """podman ps against the private engine when it is up, else the machine's rootful podman; None without podman."""
    if shutil.which("podman") is None:
        return None
    if ENGINE_SOCKET.exists():
        remote = ["podman", "--url", f"unix://{ENGINE_SOCKET}", "ps", "--format", "json"]
        if subprocess.run(remote, capture_output=True, check=False).returncode == 0:
            return remote
    return ["podman", "ps", "--format", "json"]


def timed(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds for one run; the command must succeed and print JSON."""
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    json.loads(proc.stdout)
    return elapsed


def import_highlights(limit: int = 12) -> list[str]:
    """The slowest cumulative imports of gpuctl.cli."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import gpuctl.cli"], capture_output=True, text=True, check=True
    )
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    rows.sort(reverse=True)
    return [f"{cumulative / 1000:7.1f} ms  {name.strip()}" for cumulative, name in rows[:limit]]


def start_sessions(socket: str) -> None:
    """Two live sessions (one per GPU), so the listing has content."""
    for difficulty in ("low", "high"):
        args = ["submit", MODEL_ID, "stream", "--difficulty", difficulty, "--meta", "max_tokens=2"]
        result = run_gpuctl(socket, args)
        if result.returncode != 0:
            raise SystemExit(f"could not start a session: {result.stderr}")


def main() -> None:
    """Measure, alternating, and print medians and the ratio."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rounds = int(args[0]) if args else 30
    podman = podman_command()
    if podman is None:
        raise SystemExit("podman is not installed: no baseline to compare with")
    host = start_host()
    try:
        start_sessions(host.socket)
        gpuctl = [*gpuctl_command(), "--socket", host.socket, "sessions", "ls", "-o", "json"]
        env = gpuctl_env({"CONTAINERS_CONF": str(REPO / "tests" / "engines" / "containers.conf")})
        # An installed gpuctl has its bytecode compiled (pip does it); let the warm-up run write it here too.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        timed(gpuctl, env)  # warm the page cache for both
        timed(podman, env)
        ours, theirs = [], []
        # Context, not the measure: what any Python CLI here pays before its own code runs.
        floor_times: dict[str, list[float]] = {name: [] for name, _ in FLOORS}
        for _ in range(rounds):  # alternating, so load changes on the machine hit every command alike
            ours.append(timed(gpuctl, env))
            theirs.append(timed(podman, env))
            for name, command in FLOORS:
                floor_times[name].append(timed(command, env))
    finally:
        host.close()
    floors = {name: statistics.median(times) for name, times in floor_times.items()}
    g, p = statistics.median(ours), statistics.median(theirs)
    print(f"gpuctl sessions ls -o json : median {g * 1000:6.1f} ms over {rounds} runs ({' '.join(gpuctl[:1])})")
    print(f"{' '.join(podman)} : median {p * 1000:6.1f} ms over {rounds} runs")
    print(f"ratio gpuctl/podman = {g / p:.2f}")
    for name, seconds in floors.items():
        print(f"  floor: {name:<34} median {seconds * 1000:6.1f} ms")
    if "--importtime" in sys.argv:
        print("slowest imports of gpuctl.cli (cumulative):")
        print("\n".join(import_highlights()))
    remote = " (remote, over the engine's API socket)" if "--url" in podman else ""
    row = {"gpud": g * 1000, "baseline": p * 1000, "unit": "ms", "baseline_name": "podman ps --format json" + remote}
    row |= {f"floor {name}": seconds * 1000 for name, seconds in floors.items()}
    emit("gpuctl", {"gpuctl_ls": row})


if __name__ == "__main__":
    main()
