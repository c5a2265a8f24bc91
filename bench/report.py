"""The performance table: its rows (what, baseline, goal), how each is judged, and docs/performance.md.

Every row is filled from the `BENCH-RESULT` line of one benchmark (bench/common.py emit()); a row whose benchmark
did not run says why. Ratios are always gpud / baseline: for times lower is better, for throughputs higher is
better (so the model fetch ratio is curl's time over gpud's, as throughputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PLACEHOLDER = "<!-- changes:begin (the lead fills this from the profiles) -->"


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    key: str  # the key in a benchmark's result rows
    what: str
    baseline: str
    goal: str  # as printed
    kind: str  # "ratio_max", "ratio_min", "abs_max": what the goal bounds
    limit: float | None  # the bound (None: no goal, a detail row)


ROWS = (
    Row("oneoff", "one-off task, submit to task_finish (trivial python command)", "podman run --rm, same image+command",
        "<= 1.15x (aim < 1.0)", "ratio_max", 1.15),
    Row("session_rtt", "warm session task round trip, p50", "bare aiohttp JSON POST", "<= 2x", "ratio_max", 2.0),
    Row("streaming", "streaming, 5000 deltas, events/s", "bare aiohttp SSE writer", ">= 0.8x", "ratio_min", 0.8),
    Row("first_event", "first streamed event", "bare aiohttp SSE, first event", "<= 1.5 ms", "abs_max", 1.5),
    Row("model_fetch", "model fetch, 1 GiB (sha256-verified, fsynced)", "curl", ">= 0.9x, verified", "ratio_min", 0.9),
    Row("gpuctl_ls", "gpuctl sessions ls -o json", "podman ps --format json", "<= 1.5x", "ratio_max", 1.5),
    Row("cold_start", "session cold start (first task of a new session)", "same worker container started directly,"
        " until ready", "<= 1.15x", "ratio_max", 1.15),
    Row("fanin_p99", "fan-in: 200 SSE clients on sessions on 2 GPUs, worker output to client, p99",
        "bare aiohttp fan-out (context only)", "< 50 ms", "abs_max", 50.0),
    Row("fanin_rss", "fan-in: daemon RSS, max while streaming", "-", "< 200 MB", "abs_max", 200.0),
    Row("fleet_dispatch", "fleet: session task forwarded through another host, submit to first event",
        "the same request sent to the owner", "<= 1.2x", "ratio_max", 1.2),
    Row("fleet_live", "fleet: live event stream forwarded (20000 tokens, MB/s)", "the same stream from the owner",
        ">= 0.9x", "ratio_min", 0.9),
    Row("fleet_replay", "fleet: replayed event stream forwarded (MB/s)", "the same replay from the owner",
        ">= 0.9x", "ratio_min", 0.9),
)  # fmt: skip

# Detail rows: no goal of their own, printed under the table for context.
DETAILS = (
    Row("container_running_podman", "podman: create to running (runtime.run)", "podman run -d", "-", "ratio_max",
        None),
    Row("container_exit_podman", "podman: create to exit of `true`", "podman run true", "-", "ratio_max", None),
    Row("container_running_docker", "docker: create to running", "docker run -d", "-", "ratio_max", None),
    Row("container_exit_docker", "docker: create to exit of `true`", "docker run true", "-", "ratio_max", None),
    Row("sse_live", "SSE writer alone, live log (in-process)", "bare aiohttp SSE writer", "-", "ratio_min", None),
    Row("sse_replay_cold", "SSE writer alone, replay of a finished log", "bare aiohttp SSE writer", "-", "ratio_min",
        None),
    Row("fleet_get", "fleet: GET /api/sessions/<id> forwarded, round trip", "the same GET to the owner", "-",
        "ratio_max", None),
)  # fmt: skip


def fmt(value: float | None, unit: str) -> str:
    """A value with its unit, rounded for reading."""
    if value is None:
        return "-"
    if unit == "events/s":
        return f"{value / 1000:.0f}k events/s" if value >= 10000 else f"{value:.0f} events/s"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "us":
        return f"{value:.0f} us"
    if unit in ("ms", "MB", "MB/s"):
        return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{value:.0f} {unit}"


def judge(row: Row, result: Mapping[str, Any]) -> tuple[str, str]:
    """(ratio as printed, met?) for a row's result."""
    gpud, base = result.get("gpud"), result.get("baseline")
    ratio = gpud / base if isinstance(gpud, (int, float)) and isinstance(base, (int, float)) and base else None
    shown = f"{ratio:.2f}x" if ratio is not None else "-"
    if row.limit is None or gpud is None:
        return shown, "-"
    if row.kind == "abs_max":
        met = gpud <= row.limit if row.goal.startswith("<=") else gpud < row.limit
        return shown, "yes" if met else "no"
    if ratio is None:
        return shown, "?"
    met = ratio <= row.limit if row.kind == "ratio_max" else ratio >= row.limit
    return shown, "yes" if met else "no"


def table(rows: tuple[Row, ...], results: Mapping[str, Mapping[str, Any]], missing: Mapping[str, str]) -> list[str]:
    """Markdown table lines: what / gpud / baseline / ratio / goal / met?"""
    lines = ["| what | gpud | baseline | ratio | goal | met? |", "|---|---|---|---|---|---|"]
    for row in rows:
        result = results.get(row.key)
        if result is None:
            why = missing.get(row.key, "not run")
            lines.append(f"| {row.what} | {why} | {row.baseline} | - | {row.goal} | - |")
            continue
        unit = str(result.get("unit", ""))
        ratio, met = judge(row, result)
        name = result.get("baseline_name") or row.baseline
        base = f"{name}: {fmt(result['baseline'], unit)}" if result.get("baseline") is not None else str(name)
        lines.append(f"| {row.what} | {fmt(result.get('gpud'), unit)} | {base} | {ratio} | {row.goal} | {met} |")
    return lines


def details(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One bullet per row with the extra figures its benchmark reported (p99, the other baselines, ...)."""
    out = []
    for row in ROWS + DETAILS:
        result = results.get(row.key)
        if result is None:
            continue
        extra = {k: v for k, v in result.items() if k not in ("gpud", "baseline", "unit", "baseline_name")}
        if extra:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
            out.append(f"- `{row.key}`: {shown}")
    return out


def markdown(
    results: Mapping[str, Mapping[str, Any]],
    missing: Mapping[str, str],
    machine: Mapping[str, str],
    command: str,
    changes: str | None = None,
) -> str:
    """The whole docs/performance.md."""
    parts = [
        "# gpud performance",
        "",
        f"Measured by `{command}` (bench/run: every benchmark in bench/, gpud and its baseline interleaved in the"
        " same run; medians unless the row says otherwise). Regenerate with `bench/run`; `bench/run --quick` is a"
        " smoke run with tiny sizes whose numbers mean little.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        *table(ROWS, results, missing),
        "",
        "Details (other figures each benchmark printed; times in the row's unit unless named):",
        "",
        *(details(results) or ["- none"]),
        "",
        "Context rows (no goal of their own):",
        "",
        *table(DETAILS, results, missing),
        "",
        "## What was changed and why",
        "",
        PLACEHOLDER,
        changes
        or "_To be written by the lead from the profiles (bench/profile_oneoff.py: per-phase timeline and py-spy):"
        " each change, the hotspot it removed (file:function, milliseconds before and after), and the row it"
        " moved. Nothing is claimed here yet._",
        "<!-- changes:end -->",
        "",
    ]
    return "\n".join(parts)


def previous_changes(text: str) -> str | None:
    """The lead's "What was changed and why" text from an earlier docs/performance.md, kept across runs."""
    start = text.find(PLACEHOLDER)
    end = text.find("<!-- changes:end -->")
    if start < 0 or end < 0:
        return None
    body = text[start + len(PLACEHOLDER) : end].strip()
    return body if body and not body.startswith("_To be written by the lead") else None
