"""One-off task, submit to task_finish, through a real gpud vs running the same container with the engine's CLI.

Run: .venv/bin/python bench/bench_oneoff.py [--runtime podman|process] [--rounds N]
(podman: `scripts/engines.sh start`, `eval "$(scripts/engines.sh env)"`, `scripts/build-images.sh`).

gpud side: `gpud run` in its own process; POST /api/tasks/submit of a one-off whose preset runs
`python3 -c "print(...)"` in gpud-worker-python:latest, read to task_finish (gpud removes the container before it
sends task_finish, so the round is complete then). Baseline: `podman --url unix://$GPUD_TEST_PODMAN_SOCKET run
--rm` of the same image and command, with the hardening flags gpud applies (no network, all capabilities dropped,
read-only root, the same limits, a non-root uid), on the same engine; with the process runtime, the command run
directly. Rounds alternate. Prints medians, p90, the ratio gpud/baseline and gpud's median per-phase timeline
(offsets of each SSE event from the submit).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    IMAGE,
    LIMITS,
    ONEOFF_COMMAND,
    emit,
    median,
    percentile,
    podman_cli,
    running_gpud,
    runtime_args,
    submit,
)

# What gpud's spec sets for the preset (gpud/runtime/spec.py, podman_create_payload), as CLI flags.
HARDENING = [
    "--network=none", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--read-only",
    "--tmpfs=/tmp:rw,nosuid,nodev,size=64m,mode=1777", "--pids-limit=128", "--memory=512m", "--memory-swap=512m",
    "--cpus=1", "--shm-size=64m", "--user=2000065000:2000065000", "--log-driver=k8s-file",
]  # fmt: skip
assert LIMITS["memory"] == "512m" and LIMITS["pids"] == 128  # keep HARDENING in step with the preset


def baseline_command(runtime: str, plain: bool = False) -> list[str]:
    """The CLI run of the same container (or, for the process runtime, the command itself)."""
    if runtime == "process":
        return list(ONEOFF_COMMAND)
    return [*podman_cli(), "run", "--rm", *([] if plain else HARDENING), IMAGE, *ONEOFF_COMMAND]


async def time_cli(argv: list[str]) -> float:
    """Seconds for one CLI run to completion; it must succeed and print the one-off's line."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or b"hello" not in out:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({proc.returncode}): {err.decode()[-400:]}")
    return elapsed


async def measure(runtime: str, rounds: int) -> dict[str, object]:
    """Alternate gpud and CLI rounds (after one warm-up of each); return the samples."""
    gpud_times: list[float] = []
    cli_times: list[float] = []
    plain_times: list[float] = []
    phases: dict[str, list[float]] = defaultdict(list)
    with running_gpud(runtime) as gpud:
        body = gpud.body("oneoff", metadata={})
        async with aiohttp.ClientSession() as session:
            await submit(session, gpud.url, body)  # warm-up: connections, caches, first container
            await time_cli(baseline_command(runtime))
            for i in range(rounds):
                if i % 2 == 0:
                    cli_times.append(await time_cli(baseline_command(runtime)))
                started, events = await submit(session, gpud.url, body)
                if i % 2 == 1:
                    cli_times.append(await time_cli(baseline_command(runtime)))
                gpud_times.append(events[-1].at - started)
                seen: set[str] = set()
                for event in events:
                    name = phase_name(event.event, event.json())
                    if name not in seen:
                        seen.add(name)
                        phases[name].append(event.at - started)
                if runtime == "podman" and i < max(3, rounds // 3):
                    plain_times.append(await time_cli(baseline_command(runtime, plain=True)))
    return {"gpud": gpud_times, "cli": cli_times, "plain": plain_times, "phases": phases}


def phase_name(event: str, data: dict[str, object]) -> str:
    """A timeline label for an event (worker events by their status)."""
    if event in ("worker", "connection"):
        return f"{event} {data.get('status')}"
    return event


def main() -> None:
    """Parse flags, measure, print, emit."""
    args = runtime_args(__doc__.splitlines()[0], rounds=15)
    runtime = args.runtime
    samples = asyncio.run(measure(runtime, args.rounds))
    ours, theirs = samples["gpud"], samples["cli"]
    assert isinstance(ours, list) and isinstance(theirs, list)
    base_name = "podman run --rm (same hardening)" if runtime == "podman" else "the command run directly"
    g, b = median(ours), median(theirs)
    print(f"one-off task, runtime={runtime}, {args.rounds} rounds alternating")
    print(f"  gpud submit -> task_finish   median {g * 1000:7.1f} ms  p90 {percentile(ours, 90) * 1000:7.1f} ms")
    print(f"  {base_name:28} median {b * 1000:7.1f} ms  p90 {percentile(theirs, 90) * 1000:7.1f} ms")
    plain = samples["plain"]
    assert isinstance(plain, list)
    if plain:
        print(f"  podman run --rm (no flags)   median {median(plain) * 1000:7.1f} ms  ({len(plain)} runs)")
    print(f"  ratio gpud/baseline {g / b:.2f}x   gpud's own time (median difference) {(g - b) * 1000:.0f} ms")
    print("  gpud timeline (median offset from submit):")
    phases = samples["phases"]
    assert isinstance(phases, dict)
    for name, offsets in sorted(phases.items(), key=lambda kv: median(kv[1])):
        print(f"    {median(offsets) * 1000:7.1f} ms  {name}")
    row = {"gpud": g, "baseline": b, "unit": "s", "gpud_p90": percentile(ours, 90), "n": len(ours)}
    row["baseline_name"] = base_name
    if plain:
        row["baseline_plain"] = median(plain)
    emit("oneoff", {"oneoff": row})


if __name__ == "__main__":
    main()
