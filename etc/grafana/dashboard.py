#!/usr/bin/env python3
"""Generates etc/grafana/gpud.json, the gpud Grafana dashboard (standard library only).

    python3 etc/grafana/dashboard.py            # rewrite gpud.json beside this file
    python3 etc/grafana/dashboard.py --check    # exit 1 when gpud.json differs from what this writes

Edit the panels here, never the JSON: tests/monitoring/test_dashboard.py regenerates it and fails on any
difference, and tests/monitoring/test_metric_names.py checks every metric named below against a live gpud.
Import: Grafana > Dashboards > Import > upload gpud.json, then pick the Prometheus data source in the dashboard's
`Data source` drop-down (a variable, so the import asks nothing).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().with_name("gpud.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every query is scoped to the chosen job and instances.
SEL = 'job=~"$job", instance=~"$instance"'
WINDOW = "$__rate_interval"
GRID_WIDTH = 24
QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))
GPU = "{{instance}} GPU {{gpu}} ({{difficulty}})"


@dataclass
class Target:
    """One PromQL query of a panel and its legend."""

    expr: str
    legend: str = ""


@dataclass
class Panel:
    """A panel: its kind, queries, unit and size (a row's panels go left to right, wrapping at 24 columns)."""

    title: str
    targets: list[Target]
    description: str = ""
    kind: str = "timeseries"
    unit: str = "short"
    width: int | None = None  # columns; None: the row's panel width
    height: int = 8
    min: float | None = 0
    max: float | None = None
    stack: bool = False
    text: str = "auto"  # a stat panel's text: "auto" (the value), "name" (the legend, e.g. the version)
    mappings: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Row:
    """A titled row of panels, by default `width` columns each."""

    title: str
    panels: list[Panel]
    width: int = 8


def m(metric: str, extra: str = "") -> str:
    """A metric scoped to the dashboard's job and instances, with optional further matchers."""
    return f"{metric}{{{SEL}{', ' + extra if extra else ''}}}"


def rate(metric: str, by: str | None = None) -> str:
    """Per-second rate of a counter over the panel's window, summed by `by` when given."""
    expr = f"rate({m(metric)}[{WINDOW}])"
    return expr if by is None else f"sum by ({by}) ({expr})" if by else f"sum({expr})"


def inc(metric: str, by: str | None = "") -> str:
    """Increase of a counter over the panel's window, summed by `by` (all labels summed when empty)."""
    expr = f"increase({m(metric)}[{WINDOW}])"
    return expr if by is None else f"sum by ({by}) ({expr})" if by else f"sum({expr})"


def quantile(q: str, histogram: str, by: str = "") -> str:
    """A quantile of a histogram over the panel's window, keeping the labels `by`."""
    return f"histogram_quantile({q}, sum by ({by + ', ' if by else ''}le) (rate({m(histogram + '_bucket')}[{WINDOW}])))"


def quantiles(histogram: str, by: str = "") -> list[Target]:
    """p50, p95 and p99 of a histogram, one line per value of `by`."""
    prefix = f"{{{{{by}}}}} " if by else ""
    return [Target(quantile(q, histogram, by), prefix + name) for name, q in QUANTILES]


def t(expr: str, legend: str = "") -> Target:
    """A target."""
    return Target(expr, legend)


def stat(title: str, targets: list[Target], description: str = "", **kw: Any) -> Panel:
    """A small single-value panel of the overview row."""
    return Panel(title, targets, description, kind="stat", width=4, height=4, **kw)


def mapping(zero: tuple[str, str], one: tuple[str, str]) -> list[dict[str, Any]]:
    """Value mappings for a 0/1 gauge: text and colour for each."""
    options = {"0": {"text": zero[0], "color": zero[1]}, "1": {"text": one[0], "color": one[1]}}
    return [{"type": "value", "options": options}]


UP_DOWN = mapping(("down", "red"), ("up", "green"))
HEALTHY = mapping(("unhealthy", "red"), ("healthy", "green"))
LIVE = 'state=~"starting|ready|working"'

# fmt: off
ROWS = [
    Row("Overview", [
        stat("gpud", [t(m("up"), "{{instance}}")],
             "Prometheus scrapes gpud's /metrics (0 also when the API key is refused)", mappings=UP_DOWN),
        stat("Engine", [t(m("gpud_engine_up"), "{{instance}}")], "The container engine answers gpud",
             mappings=UP_DOWN),
        stat("Healthy GPUs", [t(f"sum({m('gpud_gpu_healthy')})", "healthy"),
                              t(f"count({m('gpud_gpu_healthy')})", "managed")],
             "GPUs not drained for a fatal XID or uncorrectable ECC errors, of all managed"),
        stat("Leased GPUs", [t(f"sum({m('gpud_gpu_leased')})", "leased")], "GPUs held by a session or a one-off"),
        stat("Active tasks", [t(f"sum by (status) ({m('gpud_tasks_active')})", "{{status}}")],
             "Queued and running tasks"),
        stat("Live sessions", [t(f"sum({m('gpud_sessions', LIVE)})", "live")], "Sessions starting, ready or working"),
    ]),
    Row("GPUs", [
        Panel("GPU utilisation", [t(m("gpud_gpu_utilization_ratio"), GPU)], "Share of time a kernel ran (NVML)",
              unit="percentunit", max=1),
        Panel("GPU memory", [t(m("gpud_gpu_memory_used_bytes"), GPU + " used"),
                             t(m("gpud_gpu_memory_total_bytes"), GPU + " total")],
              "Memory in use and installed, per GPU (NVML)", unit="bytes"),
        Panel("GPU health", [t(m("gpud_gpu_healthy"), GPU)],
              "Unhealthy: a fatal XID or uncorrectable ECC errors drained it until an operator undrains it",
              kind="state-timeline", max=1, mappings=HEALTHY),
        Panel("GPU temperature", [t(m("gpud_gpu_temperature_celsius"), GPU)], unit="celsius", min=None),
        Panel("GPU power", [t(m("gpud_gpu_power_watts"), GPU)], unit="watt"),
        Panel("GPU throttling", [t(f"{m('gpud_gpu_throttled')} == 1", GPU + " {{reason}}")],
              "Throttle reasons in force (NVML)", max=1),
        Panel("GPU errors", [t(inc("gpud_gpu_xid_errors_total", None), GPU + " XID"),
                             t(m("gpud_gpu_ecc_errors"), GPU + " ECC {{type}}"),
                             t(inc("gpud_gpu_auto_drains_total", "reason"), "auto-drain: {{reason}}")],
              "XID events, volatile ECC error counts, automatic drains"),
        Panel("Leased and drained", [t(m("gpud_gpu_leased"), GPU + " leased"),
                                     t(m("gpud_gpu_drained"), GPU + " drained")], max=1),
        Panel("GPU time by model and tier", [t(rate("gpud_gpu_seconds_total", "model, tier"), "{{model}} {{tier}}")],
              "GPU-seconds per second: how many GPUs each model keeps leased (counted as leases end)", stack=True),
    ]),
    Row("Sessions and queues", [
        Panel("Sessions by state", [t(f"sum by (state) ({m('gpud_sessions')})", "{{state}}")]),
        Panel("Waiting tasks", [t(f"sum({m('gpud_session_queued_tasks')})", "in session queues"),
                                t(f"""sum({m('gpud_tasks_active', 'status="queued"')})""", "queued, all")],
              "Tasks waiting (a session's queue holds SESSION_QUEUE_MAX_SIZE; more get 429)"),
        Panel("Session start and model load (p95)",
              [t(quantile("0.95", "gpud_session_start_seconds", "model"), "{{model}} session start"),
               t(quantile("0.95", "gpud_worker_ready_seconds", "model"), "{{model}} model load")],
              "Session opened -> worker ready (fetch, image, container, load); container created -> worker ready",
              unit="s"),
        Panel("Restarts, crashes, evictions", [t(inc("gpud_session_restarts_total"), "session restarts"),
                                               t(inc("gpud_worker_crashes_total", "type"), "{{type}} worker crashes"),
                                               t(inc("gpud_sessions_evicted_total"), "idle sessions evicted")],
              "Session restarts, crashed workers, and idle sessions ended to give their GPU to new work"),
    ], width=6),
    Row("Tasks", [
        Panel("Tasks finished", [t(rate("gpud_tasks_finished_total", "type, status"), "{{type}} {{status}}")],
              unit="ops", stack=True),
        Panel("Task duration", quantiles("gpud_task_duration_seconds", "type"), "Submission -> task_finish",
              unit="s"),
        Panel("Queue wait", quantiles("gpud_task_queue_wait_seconds", "type"), "Submission -> the task runs",
              unit="s"),
        Panel("Time to first output", quantiles("gpud_task_first_output_seconds", "type"),
              "Submission -> the first text a client sees", unit="s"),
        Panel("Submissions refused", [t(rate("gpud_task_submissions_refused_total", "status"), "{{status}}")],
              "429: session queue full; 503: no free GPU or engine down; others: bad requests", unit="reqps",
              stack=True),
        Panel("Retained tasks", [t(f"sum by (status) ({m('gpud_tasks_retained')})", "{{status}}")],
              "Finished tasks kept in memory (GPUD_TASK_RETENTION_SECONDS)", stack=True),
        Panel("Stream clients", [t(f"sum({m('gpud_sse_clients')})", "SSE clients"),
                                 t(inc("gpud_tasks_client_gone_cancelled_total"), "cancelled: client gone")]),
    ]),
    Row("Models and images", [
        Panel("Model fetch throughput", [t(rate("gpud_model_fetch_bytes_total", ""), "fetched")], unit="Bps"),
        Panel("Model fetch duration", quantiles("gpud_model_fetch_duration_seconds"),
              "One model's download and unpacking", unit="s"),
        Panel("Model cache", [t(m("gpud_model_cache_bytes"), "{{instance}} used"),
                              t(m("gpud_model_cache_limit_bytes"), "{{instance}} limit")],
              "Bytes of cached models; the limit when GPUD_MODEL_CACHE_MAX_BYTES sets one", unit="bytes"),
        Panel("Fetch failures, evictions, image pulls", [
            t(inc("gpud_model_fetch_failures_total"), "fetch failures"),
            t(inc("gpud_model_cache_evictions_total"), "cache evictions"),
            t(inc("gpud_image_pulls_total", "result"), "image pulls: {{result}}")]),
    ], width=6),
    Row("Engine and HTTP", [
        Panel("Engine errors", [t(inc("gpud_engine_errors_total"), "errors")], "Container engine calls that failed"),
        Panel("HTTP requests", [t(rate("gpud_http_requests_total", "app, status"), "{{app}} {{status}}")],
              unit="reqps", stack=True),
        Panel("HTTP latency (p95)",
              [t(quantile("0.95", "gpud_http_request_duration_seconds", "app, route"), "{{app}} {{route}}")],
              "Until the response starts (an SSE stream: until its headers)", unit="s"),
        Panel("HTTP connections", [
            t(f"sum by (app) ({m('gpud_http_connections_open')})", "{{app}} open"),
            t(inc("gpud_http_connections_refused_total", "app"), "{{app}} refused"),
            t(inc("gpud_http_connections_timed_out_total", "app, reason"), "{{app}} timed out ({{reason}})")]),
        Panel("Reloads", [t(inc("gpud_reloads_total", "result"), "{{result}}")]),
    ]),
    Row("Process", [
        Panel("Resident memory", [t(m("process_resident_memory_bytes"), "{{instance}}")], unit="bytes"),
        Panel("CPU", [t(rate("process_cpu_seconds_total"), "{{instance}}")], "CPU seconds per second (1 = a core)",
              unit="percentunit"),
        Panel("Open file descriptors", [t(m("process_open_fds"), "{{instance}}")]),
        stat("Uptime", [t(f"time() - {m('process_start_time_seconds')}", "{{instance}}")], unit="s"),
        stat("Version", [t(m("gpud_build_info"), "{{instance}} {{version}} (Python {{python}})")], text="name"),
    ]),
]
# fmt: on


def _variables() -> list[dict[str, Any]]:
    """Data source, job and instance drop-downs."""

    def query(name: str, label: str, expr: str, multi: bool) -> dict[str, Any]:
        variable: dict[str, Any] = {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": expr,
            "query": {"query": expr, "refId": f"{name}-variable"},
            "refresh": 2,
            "sort": 1,
            "multi": multi,
            "includeAll": multi,
            "current": {},
            "options": [],
            "hide": 0,
        }
        if multi:
            variable["allValue"] = ".*"
        return variable

    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "options": [],
        "refresh": 1,
        "regex": "",
        "hide": 0,
    }
    return [
        datasource,
        query("job", "Job", "label_values(gpud_build_info, job)", False),
        query("instance", "Instance", 'label_values(gpud_build_info{job=~"$job"}, instance)', True),
    ]


def _options(panel: Panel, defaults: dict[str, Any]) -> dict[str, Any]:
    """Panel options by kind (and the series style of time series)."""
    legend = {"displayMode": "list", "placement": "bottom", "showLegend": True}
    if panel.kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": panel.text,
            "justifyMode": "auto",
            "orientation": "auto",
        }
    if panel.kind == "state-timeline":
        return {"showValue": "never", "mergeValues": True, "rowHeight": 0.9, "legend": legend}
    defaults["custom"] = {"fillOpacity": 10, "showPoints": "never", "lineWidth": 1}
    if panel.stack:
        defaults["custom"]["stacking"] = {"mode": "normal", "group": "A"}
    return {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}


def _panel(panel: Panel, panel_id: int, x: int, y: int, width: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "mappings": panel.mappings}
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    options = _options(panel, defaults)
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            "expr": target.expr,
            "legendFormat": target.legend,
            "range": True,
            "instant": False,
        }
        for i, target in enumerate(panel.targets)
    ]
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }


def _layout(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows one under another; a row's panels left to right, wrapping to a new line at 24 columns."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in rows:
        grid = {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}
        panels.append({"id": len(panels) + 1, "type": "row", "title": row.title, "collapsed": False, "gridPos": grid})
        y += 1
        x = line_height = 0
        for panel in row.panels:
            width = panel.width or row.width
            if x + width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(_panel(panel, len(panels) + 1, x, y, width))
            x += width
            line_height = max(line_height, panel.height)
        y += line_height
    return panels


def dashboard() -> dict[str, Any]:
    """The whole dashboard, as Grafana's JSON model."""
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return {
        "title": "gpud",
        "uid": "gpud",
        "description": "gpud: GPUs, sessions and queues, tasks and latencies, refusals, model fetches, engine, "
        "HTTP, process. Generated by etc/grafana/dashboard.py.",
        "tags": ["gpud", "gpu"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 38,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": [builtin]},
        "templating": {"list": _variables()},
        "links": [],
        "panels": _layout(ROWS),
    }


def render() -> str:
    """gpud.json's exact text."""
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Write gpud.json, or with --check say whether it is up to date."""
    text = render()
    if "--check" in argv:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python3 {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
