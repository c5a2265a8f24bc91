"""Where a one-off task's time goes: a per-phase timeline, and optionally a py-spy profile of the daemon.

Run: .venv/bin/python bench/profile_oneoff.py [--rounds N] [--py-spy OUT.txt] [--session]
(needs the private Podman engine: `eval "$(scripts/engines.sh env)"`).

Starts `gpud run` (Podman runtime, GPUD_LOG_LEVEL=debug, so urllib3 logs every engine call as it returns), follows
`podman events` of the same engine, runs N one-off tasks one after another, and merges, per task, on one clock:
the client's submit and the arrival of every SSE event, gpud's log lines (engine calls, leases, task end; ms
resolution) and the engine's own events (create, init, start, died, remove; ns). Prints the timeline of the median
task and, per step, the median gap over all tasks, and gpud's CPU time per task (/proc). With --py-spy, py-spy
samples the daemon's threads (--gil: the thread holding the GIL, i.e. Python work) over the rounds and the hottest
frames are printed (the raw collapsed stacks are kept in the named file). With --session, a second gpud (default log
level) runs warm session tasks: median arrival of each event, CPU per task, and (with --py-spy) its own profile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Gpud, cpu_seconds, median, podman_cli, running_gpud, submit

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")
ENGINE_CALL = re.compile(r'"(GET|POST|DELETE) /v[\d.]+/libpod(/[^ ?]*)[^"]*" (\d+)')
CONTAINER_ID = re.compile(r"/containers/[0-9a-f]{64}")
SPY_RATE = 500


def log_events(text: str) -> list[tuple[float, str, str]]:
    """(epoch seconds, label, the raw message: it names task and container ids) for gpud's log lines worth a
    place on the timeline."""
    out = []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        message = match.group(4)
        call = ENGINE_CALL.search(message)
        if call:
            path = CONTAINER_ID.sub("/containers/{id}", call.group(2))
            out.append((stamp, f"gpud: engine {call.group(1)} {path} -> {call.group(3)} returned", message))
        elif match.group(3).startswith("gpud"):
            label = re.sub(r"\d+\.\d+", "#", re.sub(r"[0-9a-f]{12,64}", "{id}", message))[:90]
            out.append((stamp, f"gpud: {label}", message))
    return out


def engine_events(path: Path) -> list[tuple[float, str, str]]:
    """(epoch seconds, container id, status) from the `podman events --format json` output."""
    out = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("Type") != "container":
            continue
        raw = str(event["Time"]).rstrip("Z")
        whole, _, frac = raw.partition(".")
        stamp = datetime.fromisoformat(whole + "+00:00").timestamp() + float("0." + (frac or "0"))
        out.append((stamp, str(event["ID"]), str(event["Status"])))
    return out


def task_timeline(
    submitted: float, events: list, logs: list[tuple[float, str, str]], engine: list[tuple[float, str, str]]
) -> list[tuple[float, str]]:
    """The merged timeline of one task, in ms from its submit: its SSE events, the log lines naming its task or
    container id (log times are cut to the ms: a line may show up to 1 ms early), lines naming no id that fall
    inside its window, and its container's engine events."""
    end = events[-1].wall
    task_id = str(events[0].json().get("task_id"))
    container = next((e.json().get("container_id") for e in events if e.event == "worker"), None)
    ids = {task_id, *([str(container)] if container else [])}
    rows = [(0.0, "client: POST /api/tasks/submit sent")]
    rows += [((e.wall - submitted) * 1000, f"client: SSE {e.event} {phase(e)}") for e in events]
    for t, label, message in logs:
        named = re.findall(r"[0-9a-f]{32,64}", message)
        mine = any(n in ids for n in named) if named else submitted - 0.001 <= t <= end + 0.002
        if mine:
            rows.append(((t - submitted) * 1000, label))
    rows += [((t - submitted) * 1000, f"engine: {status}") for t, cid, status in engine if cid == container]
    return sorted(rows)


def phase(event: object) -> str:
    """The status of a connection/worker event."""
    data = event.json()  # type: ignore[attr-defined]
    return str(data.get("status", "")) if event.event in ("connection", "worker", "task_finish") else ""  # type: ignore[attr-defined]


def gaps(timeline: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """(label, ms since the previous row) per row."""
    out, last = [], 0.0
    for at, label in timeline:
        out.append((label, at - last))
        last = at
    return out


async def run_rounds(gpud: Gpud, rounds: int, body: dict) -> list[tuple[float, list]]:
    """Submit `rounds` tasks one after another; (wall time of each submit, its timed events)."""
    results = []
    async with aiohttp.ClientSession() as session:
        await submit(session, gpud.url, body)  # warm-up
        for _ in range(rounds):
            wall = time.time()
            _, events = await submit(session, gpud.url, body)
            results.append((wall, events))
    return results


async def idle_cpu_rate(pid: int, seconds: float = 3.0) -> float:
    """CPU seconds per second the daemon uses while nothing is asked of it."""
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


def start_py_spy(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes] | None:
    """py-spy record of the daemon (raw collapsed stacks per thread, GIL-holding samples)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed (.venv/bin/pip install py-spy); profiling skipped")
        return None
    # --gil: only the thread holding the GIL is sampled, i.e. Python work (a thread preempted inside a syscall
    # would count as on-CPU without it); the timeline says where gpud waits.
    argv = [spy, "record", "--pid", str(pid), "--rate", str(SPY_RATE), "--format", "raw", "--gil", "--threads"]
    argv += ["--duration", str(seconds), "--output", str(out), "--nonblocking"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let it attach
    return proc


def summarize_spy(path: Path, top: int = 40) -> None:
    """Inclusive samples per frame (line numbers folded), by thread; with --gil, samples are of the thread holding
    the GIL, so they add up to the Python work done, and idle waits do not count."""
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        threads[re.sub(r"_\d+$", "", frames[0].partition(": ")[2]) if frames else "?"] += n
        seen = set()
        for frame in frames[1:]:
            key = re.sub(r":\d+\)$", ")", re.sub(r" \(/.*?/(site-packages|main)/", " (", frame))
            if key not in seen:
                seen.add(key)
                inclusive[key] += n
    print(f"py-spy --gil: {total} samples at {SPY_RATE} Hz ({total / SPY_RATE:.2f} s holding the GIL); by thread:"
          f" {dict(threads.most_common(8))}")  # fmt: skip
    print("  frames by inclusive samples (share of all GIL-holding samples):")
    for key, n in inclusive.most_common(top):
        if "runpy" not in key and "click/" not in key and "__main__" not in key:
            print(f"    {n:6d} {100 * n / max(total, 1):5.1f}%  {key}")


def main() -> None:
    """Run, merge, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--py-spy", type=Path, default=None, help="write py-spy's raw collapsed stacks here")
    parser.add_argument("--session", action="store_true", help="also profile warm session round trips")
    parser.add_argument("--tasks", type=int, default=300, help="warm session tasks for --session")
    parser.add_argument("--runtime", default="podman", choices=["podman", "process"], help="for --session")
    args = parser.parse_args()
    events_file = Path("/tmp") / f"gpud-bench-events-{time.time_ns()}.json"
    with running_gpud("podman", {"GPUD_LOG_LEVEL": "debug"}) as gpud, open(events_file, "w") as sink:
        follower = subprocess.Popen([*podman_cli(), "events", "--format", "json"], stdout=sink)
        spy = start_py_spy(gpud.pid, args.py_spy, 10 + args.rounds * 2) if args.py_spy else None
        try:
            cpu_before = cpu_seconds(gpud.pid)
            results = asyncio.run(run_rounds(gpud, args.rounds, gpud.body("oneoff", metadata={})))
            cpu = (cpu_seconds(gpud.pid) - cpu_before) / (args.rounds + 1)
            print(f"gpud's own CPU per one-off task (user+system, all threads): {cpu * 1000:.1f} ms")
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            time.sleep(0.3)  # the last engine events
            follower.terminate()
            follower.wait(10)
        logs = log_events(gpud.log)
    engine = engine_events(events_file)
    events_file.unlink()
    report(results, logs, engine)
    if args.py_spy and args.py_spy.exists():
        summarize_spy(args.py_spy)
    if args.session:
        # A gpud of its own at the default log level: debug logging costs the round trip more than it tells.
        with running_gpud(args.runtime) as gpud:
            spy_out = args.py_spy.with_suffix(".session.txt") if args.py_spy else None
            spy = start_py_spy(gpud.pid, spy_out, 10 + args.tasks // 100) if spy_out else None
            try:
                session_profile(gpud, args.tasks)
            finally:
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(30)
        if spy_out and spy_out.exists():
            summarize_spy(spy_out)


def report(results: list[tuple[float, list]], logs: list, engine: list) -> None:
    """Print the median task's timeline and the median of each step's gap over all tasks."""
    totals = [(events[-1].wall - wall, i) for i, (wall, events) in enumerate(results)]
    totals.sort()
    _, mid = totals[len(totals) // 2]
    print(
        f"one-off submit -> task_finish over {len(results)} tasks: median {totals[len(totals) // 2][0] * 1000:.1f} ms"
    )
    print("timeline of the median task (ms from submit, gap since the row before):")
    wall, events = results[mid]
    timeline = task_timeline(wall, events, logs, engine)
    for (at, _), (label, gap) in zip(timeline, gaps(timeline), strict=True):
        print(f"  {at:8.1f}  (+{gap:6.1f})  {label}")
    # Per step (its label and how many times it came before in the task), the median offset and gap.
    offsets: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for wall, events in results:
        timeline = task_timeline(wall, events, logs, engine)
        seen: Counter[str] = Counter()
        for (at, _), (label, gap) in zip(timeline, gaps(timeline), strict=True):
            offsets[(label, seen[label])].append((at, gap))
            seen[label] += 1
    print("over all tasks, per step: median offset from submit, median gap since the step before (ms):")
    for (label, nth), values in sorted(offsets.items(), key=lambda kv: median([a for a, _ in kv[1]])):
        which = f" #{nth + 1}" if nth else ""
        at, gap = median([a for a, _ in values]), median([g for _, g in values])
        print(f"  {at:8.1f}  (+{gap:6.1f})  {label}{which}  (n={len(values)})")


def session_profile(gpud: Gpud, tasks: int) -> None:
    """Warm session round trips: median time to each event from the submit."""

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            _, events = await submit(session, gpud.url, gpud.body("session", metadata={}))
            sid = next(e.json()["session_id"] for e in events if e.event == "connection")
            body = gpud.body("session", session_id=sid, metadata={})
            offsets: dict[str, list[float]] = defaultdict(list)
            idle = await idle_cpu_rate(gpud.pid)
            cpu_before, wall_before = cpu_seconds(gpud.pid), time.perf_counter()
            for _ in range(tasks):
                started, events = await submit(session, gpud.url, body)
                for e in events:
                    offsets[f"{e.event} {phase(e)}"].append((e.at - started) * 1e6)
            busy = cpu_seconds(gpud.pid) - cpu_before - idle * (time.perf_counter() - wall_before)
            print(f"gpud idle CPU with the session open: {idle * 1000:.1f} ms/s (timers, log-file polling)")
            print(
                f"gpud's own CPU per warm session task (user+system, all threads, idle rate taken off):"
                f" {busy / tasks * 1e6:.0f} us"
            )
            print(f"warm session round trip over {tasks} tasks (median us from submit to each event's arrival):")
            for label, values in sorted(offsets.items(), key=lambda kv: median(kv[1])):
                print(f"  {median(values):8.0f}  {label}")
            # Finished tasks stay in memory for GPUD_TASK_RETENTION_SECONDS: does a round trip grow with them?
            finish = offsets["task_finish completed"]
            tenth = max(1, len(finish) // 10)
            early, late = median(finish[:tenth]), median(finish[-tenth:])
            print(f"  round trip p50 of the first {tenth} tasks {early:8.0f} us, of the last {tenth} {late:8.0f} us"
                  f" ({len(finish)} finished tasks retained by then)")  # fmt: skip

    asyncio.run(go())


if __name__ == "__main__":
    main()
