"""Hardening as the engines record it (their own inspect, via the podman/docker CLI), and engine outages."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpud.errors import ErrorKind
from gpud.runtime import make_runtime
from gpud.runtime.base import ContainerRuntime, ContainerSpec, EngineUnavailable, GpuDevice, Mount, Stream
from gpud.runtime.spec import build_spec
from gpud.settings.presets import Limits, Preset
from tests.integration.conftest import TEST_WORKER_UID, TEST_WORKER_USER
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
MIB = 1024**2
LIMITS = Limits(memory_bytes=300 * MIB, cpus=0.5, pids=77, shm_bytes=32 * MIB, tmpfs_bytes=48 * MIB)
# Podman's default capability set; with cap-drop ALL every one of them must be dropped.
PODMAN_DEFAULT_CAPS = {
    "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
}  # fmt: skip


def hardened_spec(run_id: str, model_dir: Path, socket_dir: Path, image: str) -> ContainerSpec:
    """A spec built by gpud's builder from a preset with distinctive limits."""
    command = ("sh", "-c", "grep CapEff /proc/self/status; sleep 60")
    preset = Preset(model_id="hard-model", name="hard", image=image, command=command, limits=LIMITS)
    spec = build_spec(
        preset,
        user=TEST_WORKER_USER,
        task_id=f"task-{run_id}",
        session_id=f"sess-{run_id}",
        gpu=GpuDevice(gpu_id="1", uuid="GPU-static-1", attach=False),
        model_dir=model_dir,
        mounts=[Mount(source=str(socket_dir), target="/run/gpud-worker", read_only=False)],
        name=f"gpud-hard-{run_id}",
    )
    return dataclasses.replace(spec, labels={**spec.labels, "gpud.test_run": run_id})


def mounts_by_target(doc: dict[str, Any]) -> dict[str, bool]:
    """Bind mount target -> writable, from an inspect document."""
    return {m["Destination"]: bool(m["RW"]) for m in doc["Mounts"] if m["Type"] == "bind"}


async def test_engine_inspect_shows_every_hardening_setting(
    engine: Any, run_id: str, model_dir: Path, tmp_path: Path, worker_image: str
) -> None:
    socket_dir = tmp_path / "sock"
    socket_dir.mkdir(mode=0o777)
    spec = hardened_spec(run_id, model_dir, socket_dir, worker_image)
    container_id = await engine.runtime.run(spec)
    out = subprocess.run(engine.cli("inspect", container_id), check=True, capture_output=True, text=True).stdout
    doc = json.loads(out)[0]
    host, config = doc["HostConfig"], doc["Config"]

    assert host["NetworkMode"] == "none"
    if engine.name == "docker":
        assert host["CapDrop"] == ["ALL"]
    else:
        assert set(host["CapDrop"]) >= PODMAN_DEFAULT_CAPS
    assert not host.get("CapAdd")
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["ReadonlyRootfs"] is True
    assert f"size={48 * MIB}" in host["Tmpfs"]["/tmp"]
    assert host["PidsLimit"] == 77
    assert host["Memory"] == 300 * MIB
    assert host["MemorySwap"] == 300 * MIB  # memory+swap == memory: no swap
    assert (host["CpuQuota"], host["CpuPeriod"]) == (50_000, 100_000)
    assert host["ShmSize"] == 32 * MIB
    assert config["User"] == TEST_WORKER_USER
    assert mounts_by_target(doc) == {"/models": False, "/run/gpud-worker": True}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["MODEL_PATH"] == "/models"
    assert (env["NVIDIA_VISIBLE_DEVICES"], env["CUDA_VISIBLE_DEVICES"], env["GPUD_GPU_ID"]) == (
        "GPU-static-1",
        "GPU-static-1",
        "1",
    )
    labels = config["Labels"]
    assert labels["gpud.managed"] == "true" and labels["gpud.uid"] == str(TEST_WORKER_UID)
    assert (labels["gpud.task_id"], labels["gpud.session_id"]) == (f"task-{run_id}", f"sess-{run_id}")
    assert (labels["gpud.gpu_uuid"], labels["gpud.model"], labels["gpud.preset"]) == (
        "GPU-static-1",
        "hard-model",
        "hard",
    )
    # And from inside: no effective capabilities at all.
    first = await asyncio.wait_for(anext(aiter(engine.runtime.logs(container_id))), 60)
    assert (first.stream, first.line.split()) == (Stream.STDOUT, ["CapEff:", "0000000000000000"])


async def test_process_runtime_says_it_is_not_isolated() -> None:
    rt = make_runtime("process")
    health = await rt.health()
    assert (rt.isolated, health.ok, health.isolated) == (False, True, False)
    assert "without container isolation" in health.detail


async def healthy(rt: ContainerRuntime) -> bool:
    """Whether the runtime's engine answers now."""
    return (await rt.health()).ok


@pytest.fixture
async def private_podman(tmp_path: Path) -> AsyncIterator[tuple[Path, list[subprocess.Popen[bytes]]]]:
    """A socket path for a private podman API service the test starts and stops; all are stopped after."""
    procs: list[subprocess.Popen[bytes]] = []
    yield tmp_path / "podman.sock", procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def start_podman_service(socket: Path) -> subprocess.Popen[bytes]:
    """`podman system service` on `socket` with the repo's CONTAINERS_CONF."""
    env = {**os.environ, "CONTAINERS_CONF": str(REPO / "tests/engines/containers.conf")}
    argv = ["podman", "system", "service", "--time=0", f"unix://{socket}"]
    # cwd: conmon may drop an `oom` marker in its working directory; keep it out of the repo.
    return subprocess.Popen(argv, env=env, cwd=socket.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def assert_unavailable(rt: ContainerRuntime) -> None:
    """Health degraded and operations raise EngineUnavailable (503)."""
    health = await rt.health()
    assert not health.ok and health.detail
    with pytest.raises(EngineUnavailable) as raised:
        await rt.list({"gpud.managed": "true"})
    assert (raised.value.code, raised.value.kind) == ("engine_unavailable", ErrorKind.UNAVAILABLE)


async def test_podman_down_is_unavailable_and_recovers_without_restart(
    private_podman: tuple[Path, list[subprocess.Popen[bytes]]], missing: Any
) -> None:
    socket, procs = private_podman
    if not shutil.which("podman"):
        missing("podman is not installed")
    rt = make_runtime("podman", str(socket))
    try:
        await assert_unavailable(rt)  # nothing listens yet
        procs.append(start_podman_service(socket))
        await wait_until(lambda: healthy(rt), "the engine to answer health checks", timeout=60)
        assert isinstance(await rt.list({"gpud.managed": "true"}), list)
        procs[-1].terminate()
        procs[-1].wait(timeout=30)
        await assert_unavailable(rt)
        procs.append(start_podman_service(socket))  # the engine returns: the same object recovers
        await wait_until(lambda: healthy(rt), "the engine to answer health checks", timeout=60)
        assert (await rt.health()).version
        assert isinstance(await rt.list({"gpud.managed": "true"}), list)
    finally:
        await rt.close()


async def test_docker_socket_appearing_later_recovers_without_restart(tmp_path: Path, socket_of: Any) -> None:
    real = socket_of("docker")
    socket = tmp_path / "docker.sock"
    rt = make_runtime("docker", str(socket))
    try:
        await assert_unavailable(rt)
        socket.symlink_to(real)  # the engine "returns" at the path the runtime was given
        await wait_until(lambda: healthy(rt), "the engine to answer health checks", timeout=60)
        assert isinstance(await rt.list({"gpud.managed": "true"}), list)
    finally:
        await rt.close()
