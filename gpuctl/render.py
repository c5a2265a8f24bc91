"""Human (table) renderings of the daemon's JSON objects; `-o json` prints those objects unchanged instead."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gpuctl.output import Style, ago, cell, duration, fields, short_id, size, table

Obj = Mapping[str, Any]


def status(health: Obj, style: Style, socket: str | None = None) -> str:
    """`gpuctl status`: health, version, uptime, runtime, GPU summary, activity (and the socket used)."""
    runtime = health.get("runtime") or {}
    gpus = health.get("gpus") or []
    leased = sum(1 for g in gpus if g.get("leased"))
    drained = sum(1 for g in gpus if g.get("drained"))
    engine = str(runtime.get("name", "?"))
    if runtime.get("version"):
        engine += f" {runtime['version']}"
    engine += ", reachable" if runtime.get("reachable") else ", UNREACHABLE"
    if runtime.get("isolated") is False:
        engine += ", no isolation (development only)"
    pairs = [
        ("status", style.state(str(health.get("status", "?")))),
        ("version", cell(health.get("version"))),
        ("uptime", f"{duration(health.get('uptime_seconds'))} (since {ago(health.get('started_at'))})"),
        ("runtime", engine),
        ("gpus", f"{len(gpus)} ({health.get('gpu_backend', '?')}): {leased} leased, {drained} drained"),
        ("sessions", f"{health.get('active_sessions', 0)} active"),
        ("tasks", f"{health.get('active_tasks', 0)} active"),
    ]
    pairs += [("problem", style.paint(str(reason), "red")) for reason in health.get("reasons") or []]
    if socket is not None:
        pairs.append(("socket", socket))
    return fields(pairs)


def gpus(items: Sequence[Obj], style: Style) -> str:
    """`gpuctl gpus`: one row per GPU."""
    rows = []
    for g in items:
        memory = g.get("memory") or {}
        used, total = memory.get("used_bytes"), memory.get("total_bytes")
        lease = g.get("leased_to")
        util = g.get("utilization_percent")
        temp = g.get("temperature_c")
        rows.append(
            [
                str(g.get("id")),
                cell(g.get("difficulty")),
                cell(g.get("name")),
                "-" if total is None else f"{size(used)}/{size(total)}",
                "-" if util is None else f"{util:g}%",
                "-" if temp is None else f"{temp:g}C",
                f"{lease['kind']} {short_id(lease['id'])} ({ago(lease.get('since'))})" if lease else "-",
                style.state("ok") if g.get("healthy", True) else style.paint("unhealthy", "red"),
                _drained(g, style),
                style.paint(str(g["error"]), "red") if g.get("error") else "-",
            ]
        )
    headers = ["ID", "DIFFICULTY", "NAME", "MEMORY", "UTIL", "TEMP", "LEASE", "HEALTH", "DRAINED", "ERROR"]
    return table(headers, rows)


def _drained(g: Obj, style: Style) -> str:
    """`no`, `drained` (by an operator), or `drained: REASON` (auto-drained, e.g. `drained: xid 79`)."""
    if not g.get("drained"):
        return "no"
    reason = g.get("drain_reason")
    return style.state("drained") + (f": {reason}" if reason and reason != "operator" else "")


def sessions(items: Sequence[Obj], style: Style) -> str:
    """`gpuctl sessions ls`."""
    rows = [
        [
            short_id(s.get("session_id")),
            cell(s.get("model_id")),
            cell(s.get("task_preset")),
            style.state(str(s.get("state"))),
            cell(s.get("gpu_id")),
            str(s.get("queue_length", 0)),
            str(s.get("tasks_run", 0)),
            ago(s.get("created_at")),
            ago(s.get("last_activity")),
        ]
        for s in items
    ]
    headers = ["SESSION", "MODEL", "PRESET", "STATE", "GPU", "QUEUE", "TASKS", "CREATED", "LAST ACTIVE"]
    return table(headers, rows)


def session(s: Obj, style: Style) -> str:
    """`gpuctl sessions show|kill|keepalive`: one session's fields."""
    return fields(
        [
            ("session", cell(s.get("session_id"))),
            ("state", style.state(str(s.get("state")))),
            ("model", f"{s.get('model_id')} / {s.get('task_preset')} ({s.get('task_difficulty')})"),
            ("gpu", f"{s.get('gpu_id')} ({s.get('gpu_uuid')})"),
            ("container", cell(s.get("container_id"))),
            ("current task", cell(s.get("current_task"))),
            ("queue", ", ".join(s.get("queue") or []) or "-"),
            ("tasks run", str(s.get("tasks_run", 0))),
            ("restarts", str(s.get("restarts", 0))),
            ("created", ago(s.get("created_at"))),
            ("last active", ago(s.get("last_activity"))),
            ("ended", ago(s.get("ended_at")) + (f" ({s['end_reason']})" if s.get("end_reason") else "")),
            ("worker", json.dumps(s.get("worker") or {}, sort_keys=True)),
        ]
    )


def tasks(items: Sequence[Obj], style: Style) -> str:
    """`gpuctl tasks ls`."""
    rows = [
        [
            short_id(t.get("task_id")),
            cell(t.get("task_type")),
            cell(t.get("model_id")),
            cell(t.get("task_preset")),
            style.state(str(t.get("status"))),
            cell(t.get("gpu_id")),
            short_id(t.get("session_id")),
            duration(t.get("elapsed_seconds")),
            ago(t.get("created_at")),
        ]
        for t in items
    ]
    headers = ["TASK", "TYPE", "MODEL", "PRESET", "STATUS", "GPU", "SESSION", "ELAPSED", "CREATED"]
    return table(headers, rows)


def task(t: Obj, style: Style) -> str:
    """`gpuctl tasks show|cancel`: one task's fields, then its text when the daemon sent it."""
    error = t.get("error")
    pairs = [
        ("task", cell(t.get("task_id"))),
        ("status", style.state(str(t.get("status")))),
        ("type", f"{t.get('task_type')} ({t.get('task_difficulty')})"),
        ("model", f"{t.get('model_id')} / {t.get('task_preset')}"),
        ("session", cell(t.get("session_id"))),
        ("gpu", cell(t.get("gpu_id"))),
        ("container", cell(t.get("container_id"))),
        ("created", ago(t.get("created_at"))),
        ("elapsed", f"{duration(t.get('elapsed_seconds'))} (timeout {duration(t.get('timeout_seconds'))})"),
        ("timings", _timings(t.get("timings") or {})),
        ("exit code", cell(t.get("exit_code"))),
        ("error", style.paint(f"{error.get('code')}: {error.get('message')}", "red") if error else "-"),
        ("events", f"{t.get('events', 0)} ({t.get('clients', 0)} client(s) attached)"),
    ]
    if t.get("result") is not None:
        pairs.append(("result", json.dumps(t["result"], sort_keys=True)))
    text = fields(pairs)
    if t.get("text"):
        text += "\n\n" + str(t["text"]).rstrip("\n")
    return text


def _timings(timings: Obj) -> str:
    """Where a task's time went, e.g. `queue 1.2s, fetch 0.0s, start 1.1s, first output 1.3s, run 4.0s` (`-`: the
    phase did not happen)."""
    names = [("queue", "queue_wait"), ("fetch", "model_fetch"), ("start", "worker_start"),
             ("first output", "first_output"), ("run", "run")]  # fmt: skip
    return ", ".join(f"{label} {duration(timings.get(f'{key}_seconds'))}" for label, key in names)


def models(items: Sequence[Obj], style: Style) -> str:
    """`gpuctl models ls`."""
    rows = []
    for m in items:
        fetching = m.get("fetching")
        rows.append(
            [
                cell(m.get("model_id")),
                size(m.get("size_bytes")),
                "yes" if m.get("complete") else style.state("starting") if fetching else "no",
                str(m.get("refcount", 0)),
                ago(m.get("last_used")),
                f"{fetching['phase']} {size(fetching.get('bytes_done'))}" if fetching else "-",
                cell(m.get("path")),
            ]
        )
    return table(["MODEL", "SIZE", "COMPLETE", "IN USE", "LAST USED", "FETCHING", "PATH"], rows)


def model(m: Obj, style: Style) -> str:
    """`gpuctl models fetch`: one model's fields."""
    return fields(
        [
            ("model", cell(m.get("model_id"))),
            ("path", cell(m.get("path"))),
            ("complete", cell(m.get("complete"))),
            ("size", size(m.get("size_bytes"))),
            ("in use by", ", ".join(m.get("in_use_by") or []) or "-"),
            ("manifest", cell(m.get("has_manifest"))),
            ("last used", ago(m.get("last_used"))),
        ]
    )


def verify(v: Obj, style: Style) -> str:
    """`gpuctl models verify`: the verdict and any problems."""
    ok = v.get("ok")
    verdict = "no manifest to check against" if ok is None else style.state("ok" if ok else "failed")
    pairs = [("model", cell(v.get("model_id"))), ("verify", verdict), ("files checked", str(v.get("files_checked")))]
    pairs += [("problem", str(p)) for p in v.get("problems") or []]
    return fields(pairs)


def presets(items: Sequence[Obj], style: Style) -> str:
    """`gpuctl presets`."""
    rows = [
        [
            cell(p.get("model_id")),
            cell(p.get("preset")),
            cell(p.get("mode")),
            cell(p.get("image")),
            size((p.get("limits") or {}).get("memory_bytes")),
            cell((p.get("limits") or {}).get("cpus")),
            " ".join(p.get("command") or []) or "-",
        ]
        for p in items
    ]
    return table(["MODEL", "PRESET", "MODE", "IMAGE", "MEMORY", "CPUS", "COMMAND"], rows)


def reload(result: Obj, style: Style) -> str:
    """`gpuctl reload`: what changed, what needs a restart, or why nothing was applied."""
    if not result.get("reloaded"):
        lines = [style.paint("reload failed; gpud keeps running with the previous configuration", "red")]
        return "\n".join(lines + [f"  {p}" for p in result.get("problems") or []])
    return fields(
        [
            ("reloaded", style.state("ok")),
            ("settings applied", ", ".join(result.get("applied") or []) or "none"),
            ("needs restart", ", ".join(result.get("needs_restart") or []) or "none"),
            ("presets changed", ", ".join(result.get("presets_changed") or []) or "none"),
        ]
    )


def event(kind: str, data: Obj, event_id: int | None) -> str:
    """One event as a human line (for `submit -v` on stderr and `tasks events`)."""
    detail = {k: v for k, v in data.items() if k != "task_id"}
    if kind == "text_delta":
        summary = json.dumps(detail.get("delta", ""))
    elif kind == "logs":
        summary = f"[{detail.get('stream')}] {detail.get('line')}"
    else:
        summary = " ".join(f"{k}={v}" for k, v in detail.items() if v is not None)
    return f"{'-' if event_id is None else event_id:>4} {kind:<11} {summary}".rstrip()
