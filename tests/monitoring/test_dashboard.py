"""The Grafana dashboard: etc/grafana/gpud.json is exactly what etc/grafana/dashboard.py writes (so the two cannot
drift), and it is a dashboard Grafana imports: unique panel ids, targets with unique refIds on the data-source
variable, panels inside the 24-column grid and not overlapping, every variable a query uses defined. (Its queries
are parsed by promtool and run against a real Prometheus in test_prometheus_*; their metric names are checked
against a live gpud in test_metric_names.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.monitoring.shipped import DASHBOARD, DASHBOARD_SCRIPT, dashboard_module, dashboard_queries, metric_names


def test_gpud_json_is_what_the_generator_writes() -> None:
    expected = dashboard_module().render()
    assert DASHBOARD.read_text(encoding="utf-8") == expected, (
        f"run: python3 {DASHBOARD_SCRIPT.relative_to(DASHBOARD.parents[2])}"
    )


def test_generator_check_mode_agrees() -> None:
    done = subprocess.run([sys.executable, str(DASHBOARD_SCRIPT), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_dashboard_is_importable() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "gpud" and board["title"] and board["schemaVersion"] >= 36
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used - variables)
            assert 'job=~"$job", instance=~"$instance"' in target["expr"], f"{panel['title']}: scoped to the choice"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    names = set().union(*(metric_names(expr) for expr in dashboard_queries().values()))
    queries = " ".join(dashboard_queries().values())
    wanted = {
        "GPU utilisation and memory": {"gpud_gpu_utilization_ratio", "gpud_gpu_memory_used_bytes"},
        "GPU health": {"gpud_gpu_healthy"},
        "sessions by state and queue": {"gpud_sessions", "gpud_session_queued_tasks"},
        "task rates by status": {"gpud_tasks_finished_total"},
        "refusals": {"gpud_task_submissions_refused_total"},
        "model fetches": {"gpud_model_fetch_bytes_total", "gpud_model_fetch_failures_total"},
        "engine errors": {"gpud_engine_errors_total"},
        "process RSS and CPU": {"process_resident_memory_bytes", "process_cpu_seconds_total"},
    }
    for what, metrics in wanted.items():
        assert metrics <= names, (what, metrics - names)
    for histogram in ("gpud_task_duration_seconds", "gpud_task_queue_wait_seconds", "gpud_task_first_output_seconds"):
        assert f"rate({histogram}_bucket" in queries and "histogram_quantile(0.99" in queries, histogram


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (app, route, le) (rate(gpud_http_request_duration_seconds_bucket{job=~"$job",'
        ' route="/api/tasks/{id}"}[$__rate_interval]))) / on (instance) group_left clamp_min(up{a="b"} offset 5m, 1)'
        " and time() - process_start_time_seconds > 1e3 or instance_type:gpud_x:p50_5m"
    )
    assert metric_names(expr) == {
        "gpud_http_request_duration_seconds_bucket",
        "up",
        "process_start_time_seconds",
        "instance_type:gpud_x:p50_5m",
    }
