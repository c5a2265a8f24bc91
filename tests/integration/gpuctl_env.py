"""A real gpud (process runtime) with the example workers as presets, and ways to run gpuctl against it.

Used by tests/integration/test_gpuctl.py and bench/bench_gpuctl.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.daemonproc import REPO, DaemonProcess
from tests.integration.stack import examples_dir

MODEL_ID = "demo-model"
TOKENS = "alpha beta gamma delta epsilon zeta eta theta iota kappa"


def presets_yaml(workers: Path) -> str:
    """A streaming session preset, a one-off preset, and a preset whose image is not allowed."""
    limits = "{memory: 256m, cpus: 1, pids: 64}"
    image = "gpud-worker-python:latest"
    return (
        "models:\n"
        f"  {MODEL_ID}:\n"
        f"    stream: {{docker_image: '{image}', command: [python3, {workers}/stream_text.py], mode: session,"
        f" readiness_timeout_seconds: 30, limits: {limits}}}\n"
        f"    oneoff: {{docker_image: '{image}', command: [python3, {workers}/oneoff.py], mode: oneoff,"
        f" limits: {limits}}}\n"
        f"    forbidden: {{docker_image: 'evil/image:1', command: [python3, {workers}/oneoff.py], mode: oneoff}}\n"
    )


@dataclass
class GpudHost:
    """A short, world-readable base dir (AF_UNIX path limits; workers run as uid 65534) and a daemon in it."""

    base: Path
    daemon: DaemonProcess

    @property
    def socket(self) -> str:
        """The daemon's admin socket."""
        return str(self.daemon.admin_socket)

    def close(self) -> None:
        """Stop the daemon and remove the base dir."""
        self.daemon.kill()
        shutil.rmtree(self.base, ignore_errors=True)


def start_host(env: Mapping[str, str] | None = None, args: Sequence[str] = ()) -> GpudHost:
    """Start gpud with the process runtime, the example presets, and a cached model holding tokens.txt; `args`
    go to `gpud run`."""
    base = Path(tempfile.mkdtemp(prefix="gctl-", dir="/tmp"))
    base.chmod(0o755)
    model_dir = base / "models" / MODEL_ID
    model_dir.mkdir(parents=True)
    (model_dir / "tokens.txt").write_text(TOKENS + "\n")
    for path in (base / "models", model_dir):
        path.chmod(0o755)
    (model_dir / "tokens.txt").chmod(0o644)
    (base / "models.yaml").write_text(presets_yaml(Path(examples_dir("process", base))))
    daemon = DaemonProcess(
        base,
        env={
            "GPUD_RUNTIME": "process",
            "GPUD_STATE_DIR": str(base / "state"),
            "MODEL_CACHE_DIR": str(base / "models"),
            "AUTO_FETCH_MODELS": "false",
            "GPUD_PRESETS_FILE": str(base / "models.yaml"),
            "ALLOWED_DOCKER_IMAGES": "gpud-worker-python:*",
            **(env or {}),
        },
        args=list(args),
    )
    try:
        daemon.start()
    except BaseException:
        daemon.kill()
        shutil.rmtree(base, ignore_errors=True)
        raise
    # gpud's sd_notify sends block once the datagram queue (net.unix.max_dgram_qlen, often 10) is full, stalling
    # its event loop; systemd always reads them, so do the same here for tests that reload many times.
    threading.Thread(target=_drain_notify, args=(daemon,), daemon=True).start()
    return GpudHost(base, daemon)


def _drain_notify(daemon: DaemonProcess) -> None:
    """Read notify datagrams until the socket is closed (DaemonProcess.kill closes it)."""
    while True:
        try:
            daemon.messages.append(daemon.notify.recv(4096).decode())
        except TimeoutError:
            continue
        except OSError:
            return


def gpuctl_command() -> list[str]:
    """The installed console script when it is there, else `python -m gpuctl` (same code)."""
    script = Path(sys.executable).with_name("gpuctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gpuctl"]


def gpuctl_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for a gpuctl subprocess (no GPUD_SOCKET leaking in, no colour)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUD_SOCKET", "NO_COLOR")}
    env.update(extra or {})
    return env


def run_gpuctl(
    socket: str, args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """gpuctl as a real subprocess against `socket`; output captured as text."""
    return subprocess.run(
        [*gpuctl_command(), "--socket", socket, *args],
        capture_output=True,
        text=True,
        env=gpuctl_env(env),
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def end_live_sessions(host: GpudHost) -> None:
    """Kill every session still live on `host` (a test's leftovers), through the admin socket."""
    _, body = host.daemon.request("GET", "/api/sessions", admin=True)
    for session in body["sessions"]:
        if session["state"] not in ("stopped", "failed"):
            host.daemon.request("DELETE", f"/api/sessions/{session['session_id']}", admin=True)
