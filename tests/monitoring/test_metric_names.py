"""Every metric the dashboard and the rules read exists in gpud's exposition: a real gpud (process runtime, NVML
stand-in GPUs so the NVML gauges are there) runs a one-off and a session task, so series created on first use
exist too, and its /metrics declares each name (a histogram's _bucket/_sum/_count count as the histogram).
Recorded series (`level:metric:ops`) must be recorded by the shipped rules; `up` is Prometheus' own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemonproc import REPO
from tests.integration.gpuctl_env import MODEL_ID, GpudHost, start_host
from tests.monitoring.shipped import dashboard_queries, declared_names, metric_names, rule_queries, rules, run_task
from tests.waiting import wait_for

KEY = {"X-API-Key": "test-key"}
PROMETHEUS_OWN = {"up"}


@pytest.fixture
def host(tmp_path: Path) -> Iterator[GpudHost]:
    """gpud on the NVML stand-in (two GPUs, 0 low and 1 high), sampling every 0.1 s, with a cache limit."""
    control = tmp_path / "nvml-control"
    control.write_text("")
    started = start_host(
        {
            "PYTHONPATH": str(REPO / "tests" / "nvml_shim"),
            "GPUD_TEST_NVML_COUNT": "2",
            "GPUD_TEST_NVML_CONTROL": str(control),
            "GPUD_GPU_BACKEND": "nvml",
            "GPU_DEVICE_IDS": "",
            "GPU_DEVICE_DIFFICULTY": "0:low,1:high",
            "GPU_METRICS_REFRESH_INTERVAL": "0.1",
            "GPUD_MODEL_CACHE_MAX_BYTES": "1g",  # gpud_model_cache_limit_bytes exists only with a limit
        }
    )
    yield started
    started.close()


def scrape(host: GpudHost) -> str:
    status, text = host.daemon.request("GET", "/metrics", headers=KEY)
    assert status == 200, text
    return str(text)


def test_every_metric_used_by_the_dashboard_and_the_rules_is_exported(host: GpudHost) -> None:
    base = {"model_id": MODEL_ID, "task_difficulty": "low"}
    run_task(host.daemon, {**base, "task_type": "oneoff", "task_preset": "oneoff"}, KEY)
    run_task(host.daemon, {**base, "task_type": "session", "task_preset": "stream"}, KEY)

    def sampled() -> str | None:
        text = scrape(host)
        return text if "gpud_gpu_temperature_celsius{" in text else None

    text = wait_for(sampled, "an NVML sample in /metrics", 10)
    exported = declared_names(text)
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used: dict[str, set[str]] = {}
    for where, expr in [*dashboard_queries().items(), *(("rule " + k, v) for k, v in rule_queries().items())]:
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    missing = {
        name: sorted(places)
        for name, places in sorted(used.items())
        if name not in PROMETHEUS_OWN and name not in (recorded if ":" in name else exported)
    }
    assert not missing, "used but not exported:\n" + "\n".join(f"  {n}: {', '.join(p)}" for n, p in missing.items())
    assert len(used) > 40, sorted(used)  # the extraction found the queries' names, not nothing
