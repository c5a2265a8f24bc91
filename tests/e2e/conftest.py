"""End-to-end deployment tests: gpud installed on a Debian host under a real systemd, and gpud in a container.

They need root, mmdebstrap and the engines of scripts/engines.sh; without them they skip (fail under
GPUD_REQUIRE_ENGINES=1, as the engine tests do). Images are built by scripts/build-deploy-images.sh and cached by
the hash of their inputs, so only a change to gpud or to an image's definition rebuilds one. Workers always run on
the test engines (the "host's" engine), reached through its socket mounted into the container under test.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SOCKET_ENV = {"podman": "GPUD_TEST_PODMAN_SOCKET", "docker": "GPUD_TEST_DOCKER_SOCKET"}
CONTAINERS_CONF = REPO / "tests" / "engines" / "containers.conf"
# The host directory the engine bind-mounts into workers must be the one gpud names: the systemd "host" keeps its
# state at /var/lib/gpud, so the test machine's /var/lib/gpud is lent to it (and only while this lock is held).
HOST_STATE = Path("/var/lib/gpud")
OWNED_MARK = ".gpud-e2e-owned"


def missing(reason: str) -> None:
    """Skip, or fail when engines are required (CI)."""
    if os.environ.get("GPUD_REQUIRE_ENGINES") == "1":
        pytest.fail(f"{reason} (GPUD_REQUIRE_ENGINES=1: the end-to-end tests must run)")
    pytest.skip(reason)


def engine_socket(name: str) -> str:
    """The test engine's socket, or skip/fail."""
    path = os.environ.get(SOCKET_ENV[name], "")
    if not path or not os.path.exists(path):
        missing(f"{name}: {SOCKET_ENV[name]} is not set or its socket is missing; run scripts/engines.sh")
    return path


def need_tools(*tools: str) -> None:
    """Root and the named programs, or skip/fail."""
    if os.geteuid() != 0:
        missing("the end-to-end tests run as root (they start privileged containers)")
    for tool in tools:
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (scripts/setup.sh installs it)")


def engine_env() -> dict[str, str]:
    """The environment for the podman and docker CLIs: the tests' containers.conf, the test Docker socket."""
    env = dict(os.environ, CONTAINERS_CONF=os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF)))
    if os.environ.get("GPUD_TEST_DOCKER_SOCKET"):
        env["DOCKER_HOST"] = f"unix://{os.environ['GPUD_TEST_DOCKER_SOCKET']}"
    return env


def run(
    *args: str | Path, check: bool = True, timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure the assertion shows its output."""
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=engine_env(), **kwargs
    )  # type: ignore[call-overload]
    if check:
        assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def build_images(*image_dirs: str, engines: str = "podman,docker") -> None:
    """Build (or find cached) deployment images; scripts/build-deploy-images.sh skips what is up to date."""
    run(REPO / "scripts" / "build-deploy-images.sh", "--engines", engines, *image_dirs, timeout=900)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpud's wheel and every dependency (scripts/wheelhouse.sh; dependencies cached under .cache/wheelhouse)."""
    need_tools()
    out = tmp_path_factory.mktemp("wheelhouse")
    run(REPO / "scripts" / "wheelhouse.sh", out, timeout=600)
    return out


@pytest.fixture(scope="session")
def host_state_dir() -> Iterator[Path]:
    """/var/lib/gpud of this machine, lent to one test at a time; refused when it holds anything not ours."""
    lock = open("/run/lock/gpud-e2e-state.lock", "w")  # noqa: SIM115 (held for the whole session)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        # Empty directories (a default model cache made by some run) are nobody's data; a file is.
        holds_files = HOST_STATE.exists() and any(not p.is_dir() for p in HOST_STATE.rglob("*"))
        if holds_files and not (HOST_STATE / OWNED_MARK).exists():
            missing(f"{HOST_STATE} exists and is not the tests' (is gpud installed on this machine?)")
        yield HOST_STATE
    finally:
        clear_host_state()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def reset_host_state(models_from: Path) -> None:
    """An empty /var/lib/gpud marked as the tests', with the demo model in its cache (as an operator places one)."""
    clear_host_state()
    HOST_STATE.mkdir(mode=0o711, exist_ok=True)
    (HOST_STATE / OWNED_MARK).touch()
    shutil.copytree(models_from, HOST_STATE / "models" / models_from.name)
    for path in (HOST_STATE / "models").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (HOST_STATE / "models").chmod(0o755)


def clear_host_state() -> None:
    """Remove what the tests left in /var/lib/gpud (only when it is theirs, or holds nothing but directories)."""
    if not HOST_STATE.exists():
        return
    if not (HOST_STATE / OWNED_MARK).exists() and any(not p.is_dir() for p in HOST_STATE.rglob("*")):
        return
    for entry in HOST_STATE.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    shutil.rmtree(HOST_STATE, ignore_errors=True)


def worker_containers(engine: str, label: str | None = None) -> list[str]:
    """Names of the engine's containers that gpud made (label gpud.managed=true), optionally with one more label."""
    args = [engine, "ps", "-a", "--filter", "label=gpud.managed=true", "--format", "{{.Names}}"]
    if label:
        args += ["--filter", f"label={label}"]
    return [line for line in run(*args).stdout.split() if line]


def unique(prefix: str) -> str:
    """A container name no other run uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sessions_of(body: Any) -> list[dict[str, Any]]:
    """The session list of `gpuctl sessions ls -o json` (a list, or under "sessions")."""
    return list(body.get("sessions", []) if isinstance(body, dict) else body)
