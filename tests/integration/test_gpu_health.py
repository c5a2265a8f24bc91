"""GPU health end to end: a real `gpud run` whose `import pynvml` is the NVML stand-in (tests/nvml_shim), steered
through a control file. An XID on GPU 0 and uncorrectable ECC errors on GPU 2 auto-drain them: the reason shows in
/health (degraded), /api/gpus, `gpuctl gpus`, a warning log line and the metrics; no new lease lands on them (the
other GPU of the tier takes the work, or 503 when there is none) until an operator undrains them; a lease already
running is not stopped; a new fatal XID after the undrain drains again.

Drains outlive gpud (gpud/gpu/drains.py): an operator's drain and an auto-drain hold after a clean restart and after
kill -9 until undrained, and a hostile or odd drains file neither stops gpud nor is written through.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpud.gpu.drains import DRAINS_FILE
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


def nvml_host(control: Path, **env: str) -> GpudHost:
    """gpud on the NVML backend with three stand-in GPUs: 0 and 1 tagged low, 2 (the only one) high."""
    return start_host(
        {
            "PYTHONPATH": str(REPO / "tests" / "nvml_shim"),
            "GPUD_TEST_NVML_COUNT": "3",
            "GPUD_TEST_NVML_CONTROL": str(control),
            "GPUD_GPU_BACKEND": "nvml",
            "GPU_DEVICE_IDS": "",  # every GPU NVML sees
            "GPU_DEVICE_DIFFICULTY": "0:low,1:low,2:high",
            "GPU_METRICS_REFRESH_INTERVAL": "0.1",
            **env,
        }
    )


@pytest.fixture
def host(control: Path) -> Iterator[GpudHost]:
    """The three stand-in GPUs."""
    started = nvml_host(control)
    yield started
    started.close()


@pytest.fixture
def strict_host(control: Path) -> Iterator[GpudHost]:
    """The same, but new work never ends an idle session for its GPU: with GPU 0 held by a session, tier low has
    only GPU 1 to give, so where a task lands (or its 503) shows whether GPU 1 is drained."""
    started = nvml_host(control, GPUD_SESSION_EVICT_IDLE="false")
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


# ---- drains across restarts -----------------------------------------------------------------------------------------


def restart(host: GpudHost, kill: bool = False, meanwhile: Callable[[], None] | None = None) -> None:
    """Stop gpud (SIGTERM and its clean shutdown, or SIGKILL: none at all), run `meanwhile`, and start it again on
    the same state dir, port and admin socket; returns once it says READY=1. Each run logs to its own file."""
    daemon = host.daemon
    daemon.signal(signal.SIGKILL if kill else signal.SIGTERM)
    assert daemon.wait(30) == (-signal.SIGKILL if kill else 0), daemon.log
    if meanwhile is not None:
        meanwhile()
    runs = len(list(daemon.tmp.glob(f"gpud-{daemon.port}*.log")))
    daemon.stderr_path = daemon.tmp / f"gpud-{daemon.port}-run{runs + 1}.log"
    daemon.messages.clear()  # the READY=1 of the run before
    daemon.start()


def drains_file(host: GpudHost) -> Path:
    return host.base / "state" / DRAINS_FILE


def saved_drains(host: GpudHost) -> list[dict[str, Any]]:
    return list(json.loads(drains_file(host).read_text())["drains"])


def hold_gpu_0(host: GpudHost) -> str:
    """Open a session of tier low (it takes GPU 0, the lowest free) and leave it idle, holding GPU 0; its id."""
    status, events = submit(host, "low", task_type="session", task_preset="stream", metadata={"max_tokens": 2})
    assert status == 200 and gpu_of(host, events) == 0
    return str(next(data["session_id"] for _kind, data in events if data.get("session_id")))


def end_session(host: GpudHost, session_id: str) -> None:
    status, _ = host.daemon.request("DELETE", f"/api/sessions/{session_id}", admin=True)
    assert status in (200, 202, 204)
    wait_for(lambda: not gpus(host)[0]["leased"], "the session's lease released")


def test_an_operator_drain_survives_restart_and_kill_9_until_undrained(strict_host: GpudHost) -> None:
    host = strict_host
    drained = run_gpuctl(host.socket, ["gpu", "drain", "1"])
    assert drained.returncode == 0, drained.stderr
    # Written before the admin call answered: a kill -9 right after cannot lose it.
    assert saved_drains(host) == [{"uuid": "GPU-0000-1", "index": 1, "reason": "operator", "unhealthy": False}]
    assert oct(drains_file(host).stat().st_mode & 0o777) == "0o600"

    for kill in (False, True):
        restart(host, kill=kill)
        one = gpus(host)[1]
        assert (one["drained"], one["drain_reason"], one["healthy"]) == (True, "operator", True), one
        assert "GPU 1 (GPU-0000-1) stays drained from before the restart: operator" in host.daemon.log
        assert "drained" in run_gpuctl(host.socket, ["gpus"]).stdout.splitlines()[2]
        assert metric(host, "gpud_gpu_drained", gpu="1") == 1
        # GPU 0 held by an idle session: tier low's other GPU is drained, so a new low task is refused (503),
        # not put on GPU 1.
        session_id = hold_gpu_0(host)
        status, refused = submit(host, "low")
        assert status == 503 and refused["error"]["code"] == "no_gpu_available", refused
        end_session(host, session_id)

    undrained = run_gpuctl(host.socket, ["gpu", "undrain", "1"])
    assert undrained.returncode == 0, undrained.stderr
    assert saved_drains(host) == []
    restart(host)
    assert not gpus(host)[1]["drained"] and "stays drained" not in host.daemon.log
    session_id = hold_gpu_0(host)
    status, events = submit(host, "low")
    assert status == 200 and gpu_of(host, events) == 1
    end_session(host, session_id)


def test_an_auto_drain_for_xid_79_survives_restart_and_kill_9(strict_host: GpudHost, control: Path) -> None:
    host = strict_host
    hardware(control, "xid 0 79")
    wait_for(lambda: gpus(host)[0]["drain_reason"] == "xid 79", "GPU 0 auto-drained for XID 79", timeout=20)
    assert saved_drains(host) == [{"uuid": "GPU-0000-0", "index": 0, "reason": "xid 79", "unhealthy": True}]
    # The next gpud's NVML stand-in starts from healthy GPUs (NVML does not replay an XID): only the file remembers.
    control.write_text("")

    for kill in (True, False):
        restart(host, kill=kill)
        status, health = host.daemon.request("GET", "/health")
        assert status == 503 and health["status"] == "degraded", health
        assert "GPU 0 unhealthy: xid 79 (drained until undrained)" in health["reasons"]
        zero = health["gpus"][0]
        assert (zero["healthy"], zero["drained"], zero["drain_reason"]) == (False, True, "xid 79"), zero
        assert zero["xid_errors"] == 0  # this gpud saw no XID: the drain came from the file
        listed = gpus(host)[0]
        assert (listed["healthy"], listed["drained"], listed["drain_reason"]) == (False, True, "xid 79"), listed
        row = run_gpuctl(host.socket, ["gpus"]).stdout.splitlines()[1]
        assert "unhealthy" in row and "drained: xid 79" in row, row
        assert metric(host, "gpud_gpu_healthy", gpu="0") == 0 and metric(host, "gpud_gpu_drained", gpu="0") == 1
        assert metric(host, "gpud_gpu_auto_drains_total", reason="xid") == 0  # faults seen by this gpud only
        for _ in range(2):
            status, events = submit(host, "low")
            assert status == 200 and gpu_of(host, events) == 1

    status, body = host.daemon.request("POST", "/api/gpus/0/undrain", admin=True)
    assert status == 200 and body["healthy"] and not body["drained"]
    restart(host)
    status, health = host.daemon.request("GET", "/health")
    assert status == 200 and health["status"] == "ok", health
    status, events = submit(host, "low")
    assert status == 200 and gpu_of(host, events) == 0


def test_an_odd_drains_file_neither_stops_gpud_nor_is_written_through(strict_host: GpudHost) -> None:
    """Reading refuses what gpud did not write itself: a symlink (not followed: O_NOFOLLOW), anything but a regular
    file (a FIFO cannot hang the start: O_NONBLOCK), a file not owned by gpud's user or writable by others, one
    over 64 KiB (at most 64 KiB + 1 byte is read), and a document that does not parse. Each is a warning naming the
    path; gpud starts without those drains. Writing renames a new file over the name: a symlink there is replaced."""
    host = strict_host
    path = drains_file(host)
    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    document = json.dumps(
        {"version": 1, "drains": [{"uuid": "GPU-0000-1", "index": 1, "reason": "operator", "unhealthy": False}]}
    )

    def garbage() -> None:
        path.write_text('{"version": 1, "drains": [{"uuid": "GPU-0000-1", "ind\x00')

    def symlink() -> None:
        path.symlink_to("/etc/passwd")

    def fifo() -> None:
        os.mkfifo(path, 0o600)

    def someone_elses() -> None:
        path.write_text(document)  # would drain GPU 1, if trusted
        os.chown(path, 65534, 65534)

    def huge() -> None:
        with path.open("wb") as file:
            file.write(document.encode())
            file.truncate(2 * 1024**3)  # sparse: costs no disk; gpud must not read 2 GiB

    for plant, why in [
        (garbage, "Invalid control character"),
        (symlink, "a symbolic link (not followed)"),
        (fifo, "not a regular file"),
        (someone_elses, "owned by uid 65534"),
        (huge, "larger than 65536 bytes"),
    ]:
        path.unlink(missing_ok=True)  # the last case's file (gpud has it open no more: it read it once at start)
        restart(host, kill=True, meanwhile=plant)
        warning = next(line for line in host.daemon.log.splitlines() if "ignoring the saved GPU drains" in line)
        assert "WARNING" in warning and str(path) in warning and why in warning, warning
        assert not any(g["drained"] for g in gpus(host).values())
        status, health = host.daemon.request("GET", "/health")
        assert status == 200 and health["status"] == "ok", health

        if plant is symlink:  # the next drain replaces the link with gpud's own file; /etc/passwd is untouched
            status, _ = host.daemon.request("POST", "/api/gpus/1/drain", admin=True)
            assert status == 200
            assert not path.is_symlink() and path.stat().st_uid == os.geteuid()
            assert saved_drains(host)[0]["uuid"] == "GPU-0000-1"
            assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd
            status, _ = host.daemon.request("POST", "/api/gpus/1/undrain", admin=True)
            assert status == 200 and saved_drains(host) == []
