"""The daemon's registry on its own: `_created` series only when asked for, every labelled family exported from the
start, process metrics in the daemon's registry (not prometheus_client's global one)."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gpud.metrics import Metrics
from gpud.settings import load


def families(metrics: Metrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Each family's samples from a render."""
    text = metrics.render().decode()
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_created_series_are_off_unless_the_setting_asks_for_them() -> None:
    assert load(None, environ={}).metrics_created_series is False
    assert load(None, environ={"GPUD_METRICS_CREATED_SERIES": "true"}).metrics_created_series is True
    quiet, loud = Metrics(), Metrics(created_series=True)
    for metrics in (quiet, loud):
        metrics.tasks_finished.labels("oneoff", "completed").inc()
    assert b"_created" not in quiet.render()
    assert b'gpud_tasks_finished_created{status="completed",type="oneoff"}' in loud.render()
    # Per daemon, not process-wide: the other registry keeps its own choice.
    assert b"_created" not in quiet.render()


def test_every_labelled_family_is_exported_before_anything_happens() -> None:
    metrics = Metrics()
    metrics.know_models(["m1", "m1"])
    found = families(metrics)
    labelled = {
        "gpud_tasks_finished": 8,  # 2 types x 4 final statuses
        "gpud_task_submissions_refused": 9,
        "gpud_worker_crashes": 2,
        "gpud_image_pulls": 2,
        "gpud_reloads": 2,
        "gpud_gpu_seconds": 2,  # one model x 2 tiers
        "gpud_http_connections_refused": 2,
        "gpud_http_connections_timed_out": 4,
    }
    for name, count in labelled.items():
        totals = [s for s in found[name] if s[0].endswith("_total")]
        assert len(totals) == count and all(value == 0 for _, _, value in totals), name
    for name in ("gpud_task_queue_wait_seconds", "gpud_task_first_output_seconds", "gpud_session_start_seconds"):
        assert all(value == 0 for sample, _, value in found[name] if sample.endswith("_count")), name
        assert any(sample.endswith("_count") for sample, _, _ in found[name]), name


def test_process_metrics_are_in_the_daemons_registry() -> None:
    found = families(Metrics())
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"):
        assert found[name][0][2] > 0, name
    assert "process_cpu_seconds" in found
    assert REGISTRY.get_sample_value("gpud_build_info") is None  # nothing of gpud in the global registry
