"""Starting gpud the way a new operator does: `gpud run --dev` on the process runtime and on Podman (through the
`unix://` socket form CONTAINER_HOST uses), with real tasks end to end, and no deprecation noise at start.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemonproc import REPO, DaemonProcess

DEMO_TOKENS = (REPO / "examples" / "models" / "demo-text" / "tokens.txt").read_text().split()
# What DaemonProcess sets that `--dev` must provide by itself here ("" removes the variable).
DEV_OWN = {
    name: ""
    for name in (
        "GPUD_GPU_BACKEND",
        "GPU_DEVICE_IDS",
        "GPU_DEVICE_DIFFICULTY",
        "GPUD_STATE_DIR",
        "MODEL_CACHE_DIR",
        "GPUD_PRESETS_FILE",
        "INTERNAL_API_KEY",
        "GPUD_RUNTIME",
    )
}


@pytest.fixture
def base() -> Iterator[Path]:
    """A world-traversable directory (workers run as uids of their own) standing in for the operator's home."""
    path = Path(tempfile.mkdtemp(prefix="gdev-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def submit(daemon: DaemonProcess, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Submit through the public API with the dev key; the task's events, to task_finish."""
    status, text = daemon.request("POST", "/api/tasks/submit", body, headers={"X-API-Key": "dev-key"})
    assert status == 200, text
    events, kind = [], ""
    for line in str(text).splitlines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: ") :])))
    return events


def text_of(events: list[tuple[str, dict[str, Any]]]) -> str:
    """The streamed text."""
    return "".join(data["delta"] for kind, data in events if kind == "text_delta")


def finish_of(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The task_finish event's data."""
    assert events and events[-1][0] == "task_finish", events
    return events[-1][1]


def demo_tasks(daemon: DaemonProcess) -> None:
    """The README demo's tasks: a session task, a second one on the loaded session, a one-off."""
    first = submit(daemon, session_task({"prompt": "hi", "max_tokens": 5, "delay": 0.01}))
    assert finish_of(first)["status"] == "completed", first
    assert text_of(first) == " ".join(DEMO_TOKENS[:5])
    session_id = next(data["session_id"] for kind, data in first if kind == "connection")
    second = submit(daemon, {**session_task({"max_tokens": 3, "delay": 0.01}), "session_id": session_id})
    assert finish_of(second)["status"] == "completed" and text_of(second) == " ".join(DEMO_TOKENS[:3])
    oneoff = submit(
        daemon,
        {
            "task_type": "oneoff",
            "task_difficulty": "high",
            "model_id": "demo-text",
            "task_preset": "oneoff",
            "metadata": {"prompt": "one off"},
        },
    )
    assert finish_of(oneoff)["status"] == "completed", oneoff
    assert text_of(oneoff).split() == ["one", "off"]


def session_task(metadata: dict[str, Any]) -> dict[str, Any]:
    """A demo session task."""
    return {
        "task_type": "session",
        "task_difficulty": "low",
        "model_id": "demo-text",
        "task_preset": "stream",
        "metadata": metadata,
    }


def test_dev_on_the_process_runtime_runs_the_demo_out_of_the_box(base: Path) -> None:
    """No model copied by hand, no presets written: the packaged presets' /opt/gpud/examples is mapped to a copy
    of the example workers that the workers' own uids can read."""
    daemon = DaemonProcess(
        base, env={**DEV_OWN, "XDG_STATE_HOME": str(base / "state")}, args=["--dev", "--runtime", "process"]
    )
    try:
        daemon.start()
        demo_tasks(daemon)
    finally:
        daemon.kill()
    state = base / "state" / "gpud"
    model = state / "models" / "demo-text"
    for path in (model, state / "examples"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for path in (model / "tokens.txt", state / "examples" / "stream_text.py", state / "examples" / "oneoff.py"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert "placed the demo model demo-text" in daemon.log
    assert "cannot enter" not in daemon.log


def test_dev_keeps_a_model_the_operator_placed(base: Path) -> None:
    own = base / "state" / "gpud" / "models" / "demo-text"
    own.mkdir(parents=True)
    (own / "tokens.txt").write_text("mine\n")
    daemon = DaemonProcess(
        base, env={**DEV_OWN, "XDG_STATE_HOME": str(base / "state")}, args=["--dev", "--runtime", "process"]
    )
    try:
        daemon.start()
    finally:
        daemon.kill()
    assert (own / "tokens.txt").read_text() == "mine\n"
    assert "placed the demo model" not in daemon.log


def test_dev_on_podman_through_a_unix_url_socket(base: Path, socket_of: Any) -> None:
    """The image runtimes run the same presets from the image; the engine socket given as CONTAINER_HOST has it."""
    socket = socket_of("podman")
    env = {**DEV_OWN, "XDG_STATE_HOME": str(base / "state"), "GPUD_RUNTIME_SOCKET": f"unix://{socket}"}
    daemon = DaemonProcess(base, env=env, args=["--dev", "--runtime", "podman"])
    try:
        daemon.start()
        status, health = daemon.request("GET", "/health")
        assert status == 200 and health["runtime"]["reachable"] is True, health
        assert health["runtime"]["detail"] == socket  # the bare path, taken out of the URL
        demo_tasks(daemon)
    finally:
        daemon.kill()


def test_a_non_unix_engine_socket_is_a_config_error_at_load(base: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpud", "check-config", "--dev"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(base), "GPUD_RUNTIME_SOCKET": "tcp://127.0.0.1:2375"},
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "env GPUD_RUNTIME_SOCKET: runtime_socket: expected a Unix socket" in result.stderr
    assert "'tcp://127.0.0.1:2375'" in result.stderr


def test_no_future_warning_at_start(base: Path) -> None:
    """`gpud check-config` and `gpud run` (the NVML probe imports pynvml) print no deprecation warning."""
    checked = subprocess.run(
        [sys.executable, "-W", "default", "-m", "gpud", "check-config", "--dev"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(base)},
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert "Warning" not in checked.stderr and "deprecated" not in checked.stderr
    # auto: NVML is tried (pynvml imported), then the static GPUs are used on this GPU-less machine.
    daemon = DaemonProcess(base, env={"GPUD_GPU_BACKEND": "auto"})
    try:
        daemon.start()
    finally:
        daemon.kill()
    assert "FutureWarning" not in daemon.log and "deprecated" not in daemon.log, daemon.log
    probe = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import pynvml; print(pynvml.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr


def test_gpud_depends_on_the_maintained_nvml_bindings() -> None:
    from importlib import metadata

    requires = [req.split(";")[0].replace(" ", "") for req in metadata.requires("gpud") or []]
    assert any(req.startswith("nvidia-ml-py") for req in requires), requires
    assert not any(req.startswith("pynvml") for req in requires), requires
    assert metadata.packages_distributions()["pynvml"] == ["nvidia-ml-py"]
