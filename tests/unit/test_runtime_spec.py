"""Spec building and its translation into Podman and Docker payloads (pure functions: no engine needed)."""

from __future__ import annotations

import pytest

from gpud.errors import InvalidRequest
from gpud.runtime import RUNTIMES, make_runtime
from gpud.runtime.base import ContainerSpec, ContainerState, GpuDevice, LogLine, Mount, Stream, parse_timestamp
from gpud.runtime.docker import docker_create_payload
from gpud.runtime.logsplit import LineSplitter
from gpud.runtime.podman import podman_create_payload
from gpud.runtime.process import host_path
from gpud.runtime.spec import build_spec, container_name
from gpud.settings.presets import Limits, Preset
from gpud.work.uids import WorkerIds

GIB = 1024**3
WORKER = "2000000000:2000000000"  # what gpud's WorkerIds gives a worker of a preset without `user`
PRESET = Preset(
    model_id="llama-7b",
    name="inference",
    image="gpud-worker-python:latest",
    command=("python3", "worker.py"),
    env={"MODEL_NAME": "llama-7b", "MODEL_PATH": "/elsewhere"},
)
REAL_GPU = GpuDevice(gpu_id="0", uuid="GPU-1111", attach=True)
STATIC_GPU = GpuDevice(gpu_id="1", uuid="static-1", attach=False)


def spec(gpu: GpuDevice | None = REAL_GPU, preset: Preset = PRESET, user: str = WORKER) -> ContainerSpec:
    return build_spec(
        preset,
        user=user,
        task_id="t-1",
        session_id="s-1",
        gpu=gpu,
        model_dir="/var/cache/gpud/models/llama-7b",
        mounts=[Mount("/run/gpud/sessions/s-1", "/run/gpud-worker", read_only=False)],
        env={"EXTRA": "1"},
    )


def test_defaults_are_hardened() -> None:
    s = spec()
    assert s.network_none and s.read_only_rootfs and s.no_new_privileges
    assert s.cap_drop == ("ALL",)
    assert s.user == WORKER
    assert s.limits.memory_bytes == 16 * GIB
    assert s.tmpfs_path == "/tmp"


def test_env_labels_and_mounts() -> None:
    s = spec()
    assert s.env["MODEL_PATH"] == "/models"  # gpud's value wins over the preset's
    assert s.env["MODEL_NAME"] == "llama-7b"
    assert (s.env["NVIDIA_VISIBLE_DEVICES"], s.env["CUDA_VISIBLE_DEVICES"], s.env["GPUD_GPU_ID"]) == (
        "GPU-1111",
        "GPU-1111",
        "0",
    )
    assert s.env["EXTRA"] == "1"
    assert s.labels == {
        "gpud.managed": "true",
        "gpud.task_id": "t-1",
        "gpud.session_id": "s-1",
        "gpud.gpu_uuid": "GPU-1111",
        "gpud.model": "llama-7b",
        "gpud.preset": "inference",
        "gpud.uid": "2000000000",
    }
    assert s.mounts[0] == Mount("/var/cache/gpud/models/llama-7b", "/models", read_only=True)
    assert s.mounts[1].read_only is False
    assert s.name == "gpud-s-s-1"


def test_preset_user_resolves_to_host_ids() -> None:
    ids = WorkerIds(2_000_000_000, 2_000_000_009, can_switch=True)
    resolved = {user: ids.for_preset(user, "holder").spec for user in (None, "root", "0", "1234", "1234:99")}
    assert resolved == {None: WORKER, "root": "0:0", "0": "0:0", "1234": "1234:1234", "1234:99": "1234:99"}
    assert ids.in_use == 1  # only the preset without a user took an id of its own
    root = spec(preset=Preset(model_id="m", name="p", image="i", user="root"), user=resolved["root"])
    assert (root.user, root.labels["gpud.uid"]) == ("0:0", "0")


def test_no_gpu_hides_devices() -> None:
    s = spec(gpu=None)
    assert s.env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "gpud.gpu_uuid" not in s.labels


def test_container_name_is_engine_safe() -> None:
    assert container_name("a/b c") == "gpud-t-a_b_c"


def test_podman_payload() -> None:
    p = podman_create_payload(spec())
    assert p["netns"] == {"nsmode": "none"}
    assert p["cap_drop"] == ["ALL"]
    assert p["no_new_privileges"] is True and p["read_only_filesystem"] is True
    assert p["resource_limits"] == {
        "memory": {"limit": 16 * GIB, "swap": 16 * GIB},
        "cpu": {"quota": 100_000, "period": 100_000},
        "pids": {"limit": 512},
    }
    assert p["shm_size"] == GIB
    assert p["user"] == WORKER
    tmpfs, models, sock = p["mounts"]
    assert (tmpfs["destination"], tmpfs["type"]) == ("/tmp", "tmpfs")
    assert f"size={256 * 1024**2}" in tmpfs["options"]
    assert (models["destination"], models["options"]) == ("/models", ["rbind", "ro"])
    assert (sock["destination"], sock["options"]) == ("/run/gpud-worker", ["rbind", "rw"])
    assert p["devices"] == [{"path": "nvidia.com/gpu=GPU-1111"}]  # CDI
    assert p["labels"]["gpud.managed"] == "true"
    assert p["command"] == ["python3", "worker.py"]


def test_docker_payload() -> None:
    p = docker_create_payload(spec())
    h = p["HostConfig"]
    assert h["NetworkMode"] == "none" and p["NetworkDisabled"] is True
    assert h["CapDrop"] == ["ALL"] and h["SecurityOpt"] == ["no-new-privileges"]
    assert h["ReadonlyRootfs"] is True
    assert h["Tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={256 * 1024**2},mode=1777"}
    assert (h["Memory"], h["MemorySwap"], h["PidsLimit"], h["ShmSize"]) == (16 * GIB, 16 * GIB, 512, GIB)
    assert (h["CpuQuota"], h["CpuPeriod"]) == (100_000, 100_000)
    assert h["Mounts"][0] == {
        "Type": "bind",
        "Source": "/var/cache/gpud/models/llama-7b",
        "Target": "/models",
        "ReadOnly": True,
    }
    assert h["DeviceRequests"] == [{"Driver": "nvidia", "DeviceIDs": ["GPU-1111"], "Capabilities": [["gpu"]]}]
    assert "MODEL_PATH=/models" in p["Env"] and p["User"] == WORKER and p["Tty"] is False


def test_static_gpu_attaches_no_device_but_same_env() -> None:
    s = spec(gpu=STATIC_GPU)
    assert "devices" not in podman_create_payload(s)
    assert "DeviceRequests" not in docker_create_payload(s)["HostConfig"]
    assert s.env["CUDA_VISIBLE_DEVICES"] == "static-1"


def test_fractional_cpus_quota() -> None:
    s = spec(preset=Preset(model_id="m", name="p", image="i", limits=Limits(cpus=2.5)))
    assert podman_create_payload(s)["resource_limits"]["cpu"]["quota"] == 250_000
    assert docker_create_payload(s)["HostConfig"]["CpuQuota"] == 250_000


def test_line_splitter_keeps_streams_apart() -> None:
    sp = LineSplitter()
    assert sp.feed(Stream.STDOUT, b"a\nb") == [sp_line(Stream.STDOUT, "a")]
    assert sp.feed(Stream.STDERR, b"x\n") == [sp_line(Stream.STDERR, "x")]
    assert sp.feed(Stream.STDOUT, b"c\n") == [sp_line(Stream.STDOUT, "bc")]
    sp.feed(Stream.STDOUT, b"tail")
    sp.feed(Stream.STDERR, b"etail")
    assert sp.flush(Stream.STDERR) == [sp_line(Stream.STDERR, "etail")]
    assert sp.flush() == [sp_line(Stream.STDOUT, "tail")]


def sp_line(stream: Stream, text: str) -> LogLine:
    return LogLine(stream=stream, line=text)


def test_host_path_rewrites_container_paths() -> None:
    paths = {"/models": "/cache/m", "/run/gpud-worker": "/run/gpud/s1"}
    assert host_path("/models", paths) == "/cache/m"
    assert host_path("/models/w.bin", paths) == "/cache/m/w.bin"
    assert host_path("/modelsx", paths) == "/modelsx"
    assert host_path("/run/gpud-worker/sock", paths) == "/run/gpud/s1/sock"


def test_state_and_timestamp_parsing() -> None:
    assert ContainerState.parse("Exited") is ContainerState.EXITED
    assert ContainerState.parse("stopped") is ContainerState.EXITED
    assert ContainerState.parse("configured") is ContainerState.CREATED
    assert ContainerState.parse("weird") is ContainerState.UNKNOWN
    assert parse_timestamp("2024-01-02T03:04:05.123456789Z") == pytest.approx(1704164645.123456)
    assert parse_timestamp(1700000000) == 1700000000.0


def test_runtime_registry() -> None:
    assert set(RUNTIMES) == {"podman", "docker", "process"}
    with pytest.raises(InvalidRequest) as raised:
        make_runtime("lxc")
    assert raised.value.code == "unknown_runtime"


def test_session_worker_pythonpath_puts_the_sdk_first_and_keeps_the_presets() -> None:
    from gpud.worker import session_worker_env

    assert session_worker_env()["PYTHONPATH"] == "/opt/gpud/lib"
    assert session_worker_env("/app/src")["PYTHONPATH"] == "/opt/gpud/lib:/app/src"
