"""The libpod documents the Podman runtime sends and reads: the SpecGenerator for a spec (pure, unit-tested), the
error message of an answer, and ContainerInfo/ExitStatus from list entries and inspect documents."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from podman.api.client import APIResponse

from gpud.runtime.base import CPU_PERIOD_US, ContainerInfo, ContainerSpec, ContainerState, ExitStatus


def podman_create_payload(spec: ContainerSpec) -> dict[str, Any]:
    """The libpod SpecGenerator for a spec: hardening, limits, mounts, labels, GPU (CDI)."""
    limits = spec.limits
    mounts: list[dict[str, Any]] = [
        {
            "destination": spec.tmpfs_path,
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["rw", "nosuid", "nodev", f"size={limits.tmpfs_bytes}", "mode=1777"],
        }
    ]
    for m in spec.mounts:
        mounts.append(
            {
                "destination": m.target,
                "type": "bind",
                "source": m.source,
                "options": ["rbind", "ro" if m.read_only else "rw"],
            }
        )
    payload: dict[str, Any] = {
        "image": spec.image,
        "env": dict(spec.env),
        "labels": dict(spec.labels),
        "user": spec.user,
        "cap_drop": list(spec.cap_drop),
        "no_new_privileges": spec.no_new_privileges,
        "read_only_filesystem": spec.read_only_rootfs,
        "mounts": mounts,
        "resource_limits": {
            # swap is memory+swap, as with docker's --memory-swap: equal to memory means no extra swap.
            "memory": {"limit": limits.memory_bytes, "swap": limits.memory_bytes},
            "cpu": {"quota": spec.cpu_quota_us, "period": CPU_PERIOD_US},
            "pids": {"limit": limits.pids},
        },
        "shm_size": limits.shm_bytes,
        "stop_timeout": math.ceil(spec.stop_grace_seconds),
        # gpud reads the output from this file (gpud/runtime/crilog.py), whatever the host's default driver.
        "log_configuration": {"driver": "k8s-file"},
    }
    if spec.network_none:
        payload["netns"] = {"nsmode": "none"}
    if spec.name:
        payload["name"] = spec.name
    if spec.command:
        payload["command"] = list(spec.command)
    if spec.workdir:
        payload["work_dir"] = spec.workdir
    if spec.gpu is not None and spec.gpu.attach:
        payload["devices"] = [{"path": f"nvidia.com/gpu={spec.gpu.uuid}"}]
    return payload


def message_of(resp: APIResponse) -> str:
    """The engine's error message from a libpod error body."""
    try:
        body = resp.json()
        return str(body.get("message") or body.get("cause") or body)
    except ValueError:
        return resp.text.strip() or f"HTTP {resp.status_code}"


def container_info(data: Mapping[str, Any]) -> ContainerInfo:
    """ContainerInfo from a libpod list entry or inspect document."""
    state = data.get("State")
    names = data.get("Names") or [data.get("Name", "")]
    if isinstance(state, dict):  # inspect
        status = ContainerState.parse(str(state.get("Status", "")))
        exit_code = state.get("ExitCode")
        oom = bool(state.get("OOMKilled"))
        labels = (data.get("Config") or {}).get("Labels") or {}
        image = data.get("ImageName") or data.get("Image", "")
    else:  # list
        status = ContainerState.parse(str(state or ""))
        exit_code = data.get("ExitCode")
        oom = False
        labels = data.get("Labels") or {}
        image = data.get("Image", "")
    return ContainerInfo.from_engine(
        data, name=str(names[0]), image=image, state=status, labels=labels, exit_code=exit_code, oom_killed=oom
    )


def exit_status(state: Mapping[str, Any]) -> ExitStatus:
    """How a container ended, from the `State` of its inspect document (libpod sets it when it reads conmon's exit
    file: the exit code, and OOMKilled where conmon's `oom` marker is found)."""
    return ExitStatus(
        exit_code=int(state.get("ExitCode", -1)),
        oom_killed=bool(state.get("OOMKilled")),
        error=str(state.get("Error") or ""),
    )
