"""gpud in a container ("Docker-outside-of-Docker"): it drives the host's engine through the mounted socket, and its
workers are sibling containers on that engine. Podman through deploy/gpud.container, Docker through
deploy/compose.yaml; gpuctl on the host reaches gpud through the mounted run directory.

Podman here is 4.3 (Debian 12), which has no Quadlet (Podman 4.4+): the test runs the `podman run` that Quadlet
generates from deploy/gpud.container (quadlet.py translates the keys the file uses; an unknown key fails the test,
so the file cannot drift from what is tested). Host paths are the test's own, at the same path inside and out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemonproc import free_port
from tests.e2e.conftest import (
    REPO,
    build_images,
    engine_env,
    engine_socket,
    need_tools,
    run,
    sessions_of,
    unique,
    worker_containers,
)
from tests.e2e.quadlet import podman_run_args
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

GPUCTL = [str(Path(sys.executable).with_name("gpuctl"))]


@pytest.fixture
def host_dirs() -> Iterator[Path]:
    """State (with the demo model in its cache) and run directories, reachable by worker uids (0711 down to them)."""
    base = Path("/var/tmp") / unique("gpud-e2e")
    (base / "state" / "models").mkdir(parents=True)
    (base / "run").mkdir(mode=0o755)
    base.chmod(0o711)
    shutil.copytree(REPO / "examples" / "models" / "demo-text", base / "state" / "models" / "demo-text")
    for path in [base / "state" / "models", *(base / "state" / "models").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def gpuctl(socket: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """gpuctl on the host, talking to gpud in its container through the mounted admin socket."""
    result = subprocess.run(
        [*GPUCTL, "--socket", str(socket), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    if check:
        assert result.returncode == 0, f"gpuctl {args}: {result.stdout}\n{result.stderr}"
    return result


def exercise(engine: str, socket: Path, stop: list[str]) -> None:
    """Wait for gpud, run a session task whose worker must be a sibling container, then stop gpud: no worker left."""
    wait_for(lambda: gpuctl(socket, "status", check=False).returncode == 0, f"gpud in {engine} to serve", timeout=60)
    status = json.loads(gpuctl(socket, "status", "-o", "json").stdout)
    assert status["runtime"]["name"] == engine and status["runtime"]["reachable"] is True, status
    out = gpuctl(socket, "submit", "demo-text", "stream", "--meta", "max_tokens=3", "--meta", "delay=0").stdout
    assert out.strip(), "the task streamed no text"
    sessions = sessions_of(json.loads(gpuctl(socket, "sessions", "ls", "-o", "json").stdout))
    assert len(sessions) == 1, sessions
    label = f"gpud.session_id={sessions[0]['session_id']}"
    assert len(worker_containers(engine, label)) == 1  # the worker runs on the host's engine, beside gpud
    run(*stop, timeout=120)
    assert worker_containers(engine, label) == []


@pytest.mark.podman
def test_podman_quadlet_container_runs_sibling_workers(host_dirs: Path) -> None:
    need_tools("podman", "mmdebstrap")
    engine = engine_socket("podman")
    build_images("deploy/image", engines="podman")
    name = unique("gpud-e2e-quadlet")
    state, rundir = host_dirs / "state", host_dirs / "run"
    args = podman_run_args(
        REPO / "deploy" / "gpud.container",
        name=name,
        # The unit's host paths, replaced by the test's (both sides of a volume: the paths stay identical).
        paths={"/var/lib/gpud": str(state), "/run/gpud": str(rundir), "/run/podman/podman.sock": engine},
        env={
            "GPUD_RUNTIME_SOCKET": "/run/podman/podman.sock",
            "GPUD_STATE_DIR": str(state),
            "MODEL_CACHE_DIR": str(state / "models"),
            "GPUD_ADMIN_SOCKET": str(rundir / "gpud.sock"),
            "GPUD_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
        },
    )
    try:
        run(*args)
        exercise("podman", rundir / "gpud.sock", ["podman", "stop", "-t", "60", name])
    finally:
        if not os.environ.get("GPUD_E2E_KEEP"):
            run("podman", "rm", "-f", name, check=False)


@pytest.mark.docker
def test_docker_compose_container_runs_sibling_workers(host_dirs: Path) -> None:
    need_tools("docker", "docker-compose", "mmdebstrap")
    engine = engine_socket("docker")
    build_images("deploy/image", engines="docker")
    project = unique("gpud-e2e")
    env = {
        **engine_env(),
        "DOCKER_HOST": f"unix://{engine}",
        "DOCKER_SOCKET": engine,
        "GPUD_CONTAINER_NAME": project,
        "GPUD_STATE_DIR": str(host_dirs / "state"),
        "GPUD_RUN_DIR": str(host_dirs / "run"),
        "GPUD_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
    }
    compose = ["docker-compose", "--project-name", project, "--file", str(REPO / "deploy" / "compose.yaml")]
    try:
        up = subprocess.run([*compose, "up", "-d"], env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stderr
        exercise("docker", host_dirs / "run" / "gpud.sock", ["env", f"DOCKER_HOST=unix://{engine}", *compose, "down"])
    finally:
        subprocess.run([*compose, "down", "--timeout", "5"], env=env, capture_output=True, timeout=180)
