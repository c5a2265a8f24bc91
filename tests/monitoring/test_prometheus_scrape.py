"""A real Prometheus (Debian's 2.42) scrapes a real gpud with the shipped scrape configuration, only the target,
the key file's path and the intervals changed: the key goes as `Authorization: Bearer`, read from the same one-line
file gpud reads its key from (INTERNAL_API_KEY_FILE), as docs/monitoring.md sets it up. After four tasks (two
one-offs, two on one session), what Prometheus' HTTP API answers is what happened: the task counter, a GPU gauge
(the session holds GPU 0), the duration histogram's count and sum (against the task_finish events), a quantile
inside the right buckets, a recorded quantile from the shipped rules; every rule evaluates without error, no alert
fires on this healthy gpud, and every dashboard query runs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.gpuctl_env import MODEL_ID, GpudHost, start_host
from tests.monitoring.prometheus import Prometheus
from tests.monitoring.shipped import dashboard_queries, require_tool, run_task, with_variables
from tests.waiting import WaitTimeout, wait_for

JOB = 'job="gpud"'


def wait_for_target_up(prom: Prometheus) -> dict[str, Any]:
    """The gpud target once its last scrape succeeded (its last error named when it does not)."""
    seen: dict[str, Any] = {}

    def up() -> dict[str, Any] | None:
        targets = [t for t in prom.api("targets")["activeTargets"] if t["labels"]["job"] == "gpud"]
        assert len(targets) <= 1, targets
        seen.update(targets[0] if targets else {})  # none yet: the scrape loop is still being set up
        return targets[0] if targets and targets[0]["health"] == "up" else None

    try:
        return wait_for(up, "the gpud target up", 20, interval=0.2)
    except WaitTimeout:
        raise AssertionError(f"gpud target {seen.get('health')}: {seen.get('lastError')!r}\n{prom.log}") from None


def count_reaches(prom: Prometheus, expr: str, n: float) -> None:
    """Wait until a query's value is n (Prometheus scrapes every second)."""
    wait_for(lambda: prom.value(expr) == n, f"{expr} == {n} in Prometheus", 20, interval=0.2)


def run_tasks(host: GpudHost, prom: Prometheus, headers: dict[str, str]) -> list[dict[str, Any]]:
    """Two one-offs, then two tasks on one session (which keeps GPU 0 afterwards); their task_finish events.
    Prometheus scrapes the first before the others run, so rate() over the window sees them as an increase."""
    base = {"model_id": MODEL_ID, "task_difficulty": "low"}
    oneoff = {**base, "task_type": "oneoff", "task_preset": "oneoff"}
    session = {**base, "task_type": "session", "task_preset": "stream", "metadata": {"max_tokens": 3}}
    finishes = [run_task(host.daemon, oneoff, headers)["task_finish"]]
    count_reaches(prom, f"sum(gpud_tasks_finished_total{{{JOB}}})", 1)
    finishes.append(run_task(host.daemon, oneoff, headers)["task_finish"])
    opened = run_task(host.daemon, session, headers)
    finishes.append(opened["task_finish"])
    session_id = opened["connection"]["session_id"]
    finishes.append(run_task(host.daemon, {**session, "session_id": session_id}, headers)["task_finish"])
    assert [f["status"] for f in finishes] == ["completed"] * 4, finishes
    return finishes


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A one-line API key file, as docs/monitoring.md makes /etc/gpud/api-key."""
    path = tmp_path / "api-key"
    path.write_text(secrets.token_urlsafe(24) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def host(key_file: Path) -> Iterator[GpudHost]:
    """gpud reading its key from the file (INTERNAL_API_KEY_FILE), no other key."""
    started = start_host({"INTERNAL_API_KEY": "", "INTERNAL_API_KEY_FILE": str(key_file)})
    yield started
    started.close()


@pytest.fixture
def prom(tmp_path: Path, host: GpudHost, key_file: Path) -> Iterator[Prometheus]:
    """Prometheus with the shipped configuration pointed at `host` and `key_file` (not started yet)."""
    require_tool("prometheus")
    server = Prometheus(tmp_path, f"127.0.0.1:{host.daemon.port}", key_file)
    yield server
    server.stop()


def test_prometheus_scrapes_gpud_with_the_shipped_config(host: GpudHost, prom: Prometheus, key_file: Path) -> None:
    secret = key_file.read_text().strip()
    assert "SUCCESS" in prom.check_config()
    prom.start()
    target = wait_for_target_up(prom)
    assert target["scrapeUrl"] == f"http://127.0.0.1:{host.daemon.port}/metrics"

    finishes = run_tasks(host, prom, {"Authorization": f"Bearer {secret}"})
    n = len(finishes)
    count_reaches(prom, f"sum(gpud_tasks_finished_total{{{JOB}}})", n)
    assert prom.value(f'sum(gpud_tasks_finished_total{{{JOB}, status="completed"}})') == n
    by_type = {m["type"]: v for m, v in prom.query(f"sum by (type) (gpud_tasks_finished_total{{{JOB}}})")}
    assert by_type == {"oneoff": 2, "session": 2}

    # A GPU gauge: the session's lease on GPU 0 (low); GPU 1 (high) is free.
    count_reaches(prom, f'gpud_gpu_leased{{{JOB}, gpu="0"}}', 1)
    assert prom.value(f'gpud_gpu_leased{{{JOB}, gpu="1"}}') == 0

    # The duration histogram holds the four tasks, with the elapsed times their task_finish events gave.
    elapsed = [f["elapsed_seconds"] for f in finishes]
    assert prom.value(f"sum(gpud_task_duration_seconds_count{{{JOB}}})") == n
    total = prom.value(f"sum(gpud_task_duration_seconds_sum{{{JOB}}})")
    assert total is not None and abs(total - sum(elapsed)) <= 0.0005 * n, (total, elapsed)
    buckets = f"sum by (le) (gpud_task_duration_seconds_bucket{{{JOB}}})"
    bounds = sorted(float(labels["le"]) for labels, _ in prom.query(buckets))
    lower = max((b for b in bounds if b < min(elapsed)), default=0.0)
    upper = min(b for b in bounds if b >= max(elapsed))
    median = prom.finite(f"histogram_quantile(0.5, {buckets})")
    assert median is not None and lower <= median <= upper, (median, lower, upper, elapsed)

    # The shipped recording rules run: the one-offs' p50 over 5 minutes.
    recorded = wait_for(
        lambda: prom.finite(f'instance_type:gpud_task_duration_seconds:p50_5m{{{JOB}, type="oneoff"}}'),
        "the recorded one-off p50",
        20,
        interval=0.2,
    )
    assert 0 < recorded <= upper

    groups = prom.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"gpud-alerts", "gpud-latency"}
    broken = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not broken, broken
    assert prom.api("alerts")["alerts"] == [], "a healthy gpud raises no alert"

    for where, expr in dashboard_queries().items():
        try:
            prom.query(with_variables(expr))
        except AssertionError as exc:
            raise AssertionError(f"dashboard {where}: Prometheus refuses {expr!r}: {exc}") from None
