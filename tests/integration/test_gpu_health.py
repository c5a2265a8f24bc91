"""GPU health end to end: a real `gpud run` whose `import pynvml` is the NVML stand-in (tests/nvml_shim), steered
through a control file. An XID on GPU 0 and uncorrectable ECC errors on GPU 2 auto-drain them: the reason shows in
/health (degraded), /api/gpus, `gpuctl gpus`, a warning log line and the metrics; no new lease lands on them (the
other GPU of the tier takes the work, or 503 when there is none) until an operator undrains them; a lease already
running is not stopped; a new fatal XID after the undrain drains again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemonproc import REPO
from tests.integration.gpuctl_env import MODEL_ID, GpudHost, run_gpuctl, start_host
from tests.waiting import wait_for

KEY = {"X-API-Key": "test-key"}


@pytest.fixture
def control(tmp_path: Path) -> Path:
    """The stand-in's control file (see tests/nvml_shim/pynvml.py)."""
    path = tmp_path / "nvml-control"
    path.write_text("")
    return path


@pytest.fixture
def host(control: Path) -> Iterator[GpudHost]:
    """gpud on the NVML backend with three stand-in GPUs: 0 and 1 tagged low, 2 (the only one) high."""
    started = start_host(
        {
            "PYTHONPATH": str(REPO / "tests" / "nvml_shim"),
            "GPUD_TEST_NVML_COUNT": "3",
            "GPUD_TEST_NVML_CONTROL": str(control),
            "GPUD_GPU_BACKEND": "nvml",
            "GPU_DEVICE_IDS": "",  # every GPU NVML sees
            "GPU_DEVICE_DIFFICULTY": "0:low,1:low,2:high",
            "GPU_METRICS_REFRESH_INTERVAL": "0.1",
        }
    )
    yield started
    started.close()


def hardware(control: Path, line: str) -> None:
    """Make the stand-in report something (applied at gpud's next NVML call)."""
    with control.open("a") as file:
        file.write(line + "\n")


def gpus(host: GpudHost) -> dict[int, dict[str, Any]]:
    status, body = host.daemon.request("GET", "/api/gpus", admin=True)
    assert status == 200, body
    return {g["id"]: g for g in body["gpus"]}


def metric(host: GpudHost, name: str, **labels: str) -> float:
    """One sample from a live scrape (gpu labels: only those given must match)."""
    status, text = host.daemon.request("GET", "/metrics", headers=KEY)
    assert status == 200, text
    for family in text_string_to_metric_families(str(text)):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    raise AssertionError(f"no {name}{labels} in the scrape")


def submit(host: GpudHost, difficulty: str, **extra: Any) -> tuple[int, Any]:
    """Run a one-off (or, with task_type/task_preset in `extra`, a session task); (status, events or error)."""
    body = {
        "task_type": "oneoff",
        "task_difficulty": difficulty,
        "model_id": MODEL_ID,
        "task_preset": "oneoff",
        "metadata": {"prompt": "hello there"},
        **extra,
    }
    status, text = host.daemon.request("POST", "/api/tasks/submit", body, headers=KEY)
    if status != 200:
        return status, text
    events, kind = [], ""
    for line in str(text).splitlines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: ") :])))
    assert events and events[-1][0] == "task_finish" and events[-1][1]["status"] == "completed", events
    return status, events


def gpu_of(host: GpudHost, events: list[tuple[str, dict[str, Any]]]) -> int:
    """The GPU the task ran on, as gpud recorded it."""
    task_id = next(data["task_id"] for _kind, data in events if "task_id" in data)
    status, task = host.daemon.request("GET", f"/api/tasks/{task_id}", admin=True)
    assert status == 200, task
    return int(task["gpu_id"])


def test_fatal_xid_and_uncorrectable_ecc_auto_drain_until_undrained(host: GpudHost, control: Path) -> None:
    status, health = host.daemon.request("GET", "/health")
    assert status == 200 and health["status"] == "ok", health
    assert all(g["healthy"] and g["drain_reason"] is None and g["xid_errors"] == 0 for g in health["gpus"])
    assert metric(host, "gpud_gpu_auto_drains_total", reason="xid") == 0
    assert metric(host, "gpud_gpu_auto_drains_total", reason="ecc") == 0

    # A session holds GPU 0 (the lowest free low GPU) when the fault comes: it is not stopped.
    status, first = submit(host, "low", task_type="session", task_preset="stream", metadata={"max_tokens": 2})
    assert status == 200 and gpu_of(host, first) == 0
    session_id = next(data["session_id"] for _kind, data in first if data.get("session_id"))

    hardware(control, "xid 0 79")
    wait_for(lambda: gpus(host)[0]["drain_reason"] == "xid 79", "GPU 0 auto-drained for XID 79", timeout=20)
    status, health = host.daemon.request("GET", "/health")
    assert status == 503 and health["status"] == "degraded", health
    assert "GPU 0 unhealthy: xid 79 (drained until undrained)" in health["reasons"]
    zero = health["gpus"][0]
    assert (zero["healthy"], zero["drained"], zero["xid_errors"], zero["last_xid"]) == (False, True, 1, 79)
    assert "GPU 0 (GPU-0000-0) is unhealthy (xid 79): drained" in host.daemon.log
    assert "WARNING" in next(line for line in host.daemon.log.splitlines() if "is unhealthy (xid 79)" in line)
    assert metric(host, "gpud_gpu_auto_drains_total", reason="xid") == 1
    assert metric(host, "gpud_gpu_healthy", gpu="0") == 0 and metric(host, "gpud_gpu_healthy", gpu="1") == 1
    assert metric(host, "gpud_gpu_xid_errors_total", gpu="0") == 1

    # The running session keeps its lease and takes tasks; new leases of tier low go to GPU 1 only.
    status, again = submit(
        host, "low", task_type="session", task_preset="stream", session_id=session_id, metadata={"max_tokens": 2}
    )
    assert status == 200 and gpu_of(host, again) == 0
    status, _ = host.daemon.request("DELETE", f"/api/sessions/{session_id}", admin=True)
    assert status in (200, 202, 204)
    wait_for(lambda: not gpus(host)[0]["leased"], "the session's lease released")
    for _ in range(3):
        status, events = submit(host, "low")
        assert status == 200 and gpu_of(host, events) == 1

    # Uncorrectable ECC errors on the only high GPU: drained, so high work is refused with 503.
    hardware(control, "ecc 2 5 2")
    wait_for(lambda: gpus(host)[2]["drain_reason"] == "ecc uncorrectable 2", "GPU 2 auto-drained for ECC", timeout=20)
    assert gpus(host)[2]["ecc_errors"] == {"corrected": 5, "uncorrected": 2}
    status, refused = submit(host, "high")
    assert status == 503 and refused["error"]["code"] == "no_gpu_available", refused
    assert metric(host, "gpud_gpu_auto_drains_total", reason="ecc") == 1
    assert metric(host, "gpud_gpu_ecc_errors", gpu="2", type="uncorrected") == 2

    table = run_gpuctl(host.socket, ["gpus"]).stdout.splitlines()
    assert "HEALTH" in table[0]
    assert "unhealthy" in table[1] and "drained: xid 79" in table[1]
    assert "unhealthy" in table[3] and "drained: ecc uncorrectable 2" in table[3]
    assert "unhealthy" not in table[2]

    # The operator undrains: healthy again, and work lands there again.
    undrained = run_gpuctl(host.socket, ["gpu", "undrain", "0"])
    assert undrained.returncode == 0, undrained.stderr
    assert gpus(host)[0]["healthy"] and gpus(host)[0]["drain_reason"] is None
    status, events = submit(host, "low")
    assert status == 200 and gpu_of(host, events) == 0
    status, body = host.daemon.request("POST", "/api/gpus/2/undrain", admin=True)
    assert status == 200 and body["healthy"] and not body["drained"]
    # The volatile ECC count stays 2 (until a GPU reset): it does not drain again. A non-fatal XID shows that
    # refreshes (and so health checks) have run since the undrain.
    hardware(control, "xid 2 13")
    wait_for(lambda: gpus(host)[2]["xid_errors"] == 1, "the XID 13 on GPU 2 seen")
    assert not gpus(host)[2]["drained"] and gpus(host)[2]["last_xid"] == 13
    status, events = submit(host, "high")
    assert status == 200 and gpu_of(host, events) == 2
    status, health = host.daemon.request("GET", "/health")
    assert status == 200 and health["status"] == "ok", health

    # A new fatal XID after the undrain drains again.
    hardware(control, "xid 0 48")
    wait_for(lambda: gpus(host)[0]["drain_reason"] == "xid 48", "GPU 0 drained again for XID 48", timeout=20)
    assert metric(host, "gpud_gpu_auto_drains_total", reason="xid") == 2
    status, events = submit(host, "low")
    assert status == 200 and gpu_of(host, events) == 1
