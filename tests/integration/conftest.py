"""Fixtures for runtime tests against real engines.

Engines come from `scripts/engines.sh start` (`eval "$(scripts/engines.sh env)"` sets the sockets) and the
worker image from `scripts/build-images.sh`. Without a socket the engine's tests are skipped — unless
GPUD_REQUIRE_ENGINES=1, where a missing engine or image fails the test, so CI can never pass by skipping.
Every container a test makes carries the label gpud.test_run=<id>; teardown removes them by that label and
fails the test if any is left.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpud.runtime import make_runtime
from gpud.runtime.base import Capability, ContainerRuntime, ContainerSpec, GpuDevice, ImageUnavailable
from gpud.runtime.spec import build_spec
from gpud.settings.presets import Limits, Preset

WORKER_IMAGE = os.environ.get("GPUD_TEST_WORKER_IMAGE", "gpud-worker-python:latest")
SOCKET_ENV = {"podman": "GPUD_TEST_PODMAN_SOCKET", "docker": "GPUD_TEST_DOCKER_SOCKET"}
TEST_RUN_LABEL = "gpud.test_run"
# The host user contract-test workers run as: the top of gpud's default worker uid range (a daemon allocates from
# the bottom), as gpud would give one worker of its own.
TEST_WORKER_UID = 2_000_065_535
TEST_WORKER_USER = f"{TEST_WORKER_UID}:{TEST_WORKER_UID}"
# Small limits so the contract tests exercise them quickly; the defaults (16g ...) are checked by unit tests.
TEST_LIMITS = Limits(memory_bytes=128 * 1024**2, cpus=1.0, pids=64, shm_bytes=16 * 1024**2, tmpfs_bytes=16 * 1024**2)


def engines_required() -> bool:
    """Whether a missing engine must fail rather than skip (CI sets GPUD_REQUIRE_ENGINES=1)."""
    return os.environ.get("GPUD_REQUIRE_ENGINES") == "1"


def engine_missing(reason: str) -> None:
    """Skip, or fail when engines are required."""
    if engines_required():
        pytest.fail(f"{reason} (GPUD_REQUIRE_ENGINES=1: engines and images must be present)")
    pytest.skip(reason)


def engine_socket(name: str) -> str:
    """The test socket of an engine, or skip/fail."""
    socket = os.environ.get(SOCKET_ENV[name], "")
    if not socket or not os.path.exists(socket):
        engine_missing(f"{name}: {SOCKET_ENV[name]} is not set or its socket is missing; run scripts/engines.sh")
    return socket


def require(runtime: ContainerRuntime, capability: Capability) -> None:
    """Skip, naming the reason, when the runtime does not enforce this capability."""
    if capability not in runtime.capabilities:
        pytest.skip(f"the {runtime.name} runtime does not enforce {capability.value}")


async def open_runtime(name: str) -> ContainerRuntime:
    """A runtime whose engine answers and has the worker image, or skip/fail."""
    socket = engine_socket(name) if name in SOCKET_ENV else None
    runtime = make_runtime(name, socket)
    health = await runtime.health()
    if not health.ok:
        await runtime.close()
        engine_missing(f"{name} does not answer at {socket}: {health.detail}")
    try:
        await runtime.ensure_image(WORKER_IMAGE)
    except ImageUnavailable as exc:
        await runtime.close()
        engine_missing(str(exc))
    return runtime


@pytest.fixture(params=["podman", "docker", "process"])
async def runtime(request: pytest.FixtureRequest, run_id: str) -> AsyncIterator[ContainerRuntime]:
    """Each runtime in turn; its containers from this test are removed afterwards, and leaks fail the test."""
    rt = await open_runtime(request.param)
    try:
        yield rt
    finally:
        await remove_test_containers(rt, run_id)
        await rt.close()


@dataclass
class Engine:
    """A real engine under test: its runtime and its API socket (for the engine's own CLI)."""

    name: str
    socket: str
    runtime: ContainerRuntime

    def cli(self, *args: str) -> list[str]:
        """The engine's CLI command line, pointed at the test socket."""
        if self.name == "podman":
            return ["podman", "--url", f"unix://{self.socket}", *args]
        return ["docker", "-H", f"unix://{self.socket}", *args]


@pytest.fixture(params=["podman", "docker"])
async def engine(request: pytest.FixtureRequest, run_id: str) -> AsyncIterator[Engine]:
    """Each real engine in turn (no process runtime); cleanup as for `runtime`."""
    rt = await open_runtime(request.param)
    try:
        yield Engine(name=request.param, socket=engine_socket(request.param), runtime=rt)
    finally:
        await remove_test_containers(rt, run_id)
        await rt.close()


async def remove_test_containers(rt: ContainerRuntime, run_id: str) -> None:
    """Remove this test's containers by label; fail if any survives removal."""
    for info in await rt.list({TEST_RUN_LABEL: run_id}):
        await rt.remove(info.id)
    left = await rt.list({TEST_RUN_LABEL: run_id})
    assert not left, f"containers leaked: {[c.id for c in left]}"


@pytest.fixture
def missing() -> Callable[[str], None]:
    """engine_missing: skip, or fail under GPUD_REQUIRE_ENGINES=1."""
    return engine_missing


@pytest.fixture
def socket_of() -> Callable[[str], str]:
    """engine_socket: an engine's test socket, or skip/fail."""
    return engine_socket


@pytest.fixture
def worker_image() -> str:
    """The worker image tests run (GPUD_TEST_WORKER_IMAGE, default gpud-worker-python:latest)."""
    return WORKER_IMAGE


@pytest.fixture
def run_id() -> str:
    """A label value unique to this test."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory with one file, readable by the unprivileged worker user."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "weights.txt").write_text("weights-v1\n")
    # pytest's tmp dirs are 0700 root: open the path so the worker's own uid can reach the models.
    for path in [*reversed(models.parents[:3]), models]:
        path.chmod(path.stat().st_mode | 0o755)
    (models / "weights.txt").chmod(0o644)
    return models


@dataclass
class SpecMaker:
    """Builds test specs through gpud's own spec builder, labelled for cleanup."""

    run_id: str
    model_dir: Path

    def __call__(self, *command: str, limits: Limits = TEST_LIMITS, **kwargs: Any) -> ContainerSpec:
        """A hardened spec for this command with a unique task id and name."""
        task_id = uuid.uuid4().hex[:12]
        preset = Preset(model_id="test-model", name="contract", image=WORKER_IMAGE, command=command, limits=limits)
        spec = build_spec(
            preset,
            user=kwargs.pop("user", TEST_WORKER_USER),
            task_id=task_id,
            session_id=f"sess-{self.run_id}",
            gpu=kwargs.pop("gpu", GpuDevice(gpu_id="0", uuid="GPU-static-0", attach=False)),
            model_dir=self.model_dir,
            name=f"gpud-test-{self.run_id}-{task_id}",
            stop_grace_seconds=kwargs.pop("stop_grace_seconds", 2.0),
            mounts=kwargs.pop("mounts", ()),
        )
        labels = {**spec.labels, TEST_RUN_LABEL: self.run_id}
        return dataclasses.replace(spec, labels=labels, **kwargs)


@pytest.fixture
def make_spec(run_id: str, model_dir: Path) -> Callable[..., ContainerSpec]:
    """SpecMaker for this test."""
    return SpecMaker(run_id=run_id, model_dir=model_dir)
