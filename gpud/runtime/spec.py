"""Build a worker's ContainerSpec from a preset, the task and session ids, its GPU and the model directory."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from gpud.runtime.base import (
    LABEL_GPU,
    LABEL_MANAGED,
    LABEL_MODEL,
    LABEL_PRESET,
    LABEL_SESSION,
    LABEL_TASK,
    LABEL_UID,
    MODELS_PATH,
    ContainerSpec,
    GpuDevice,
    Mount,
)
from gpud.settings.presets import Preset

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


def container_name(task_id: str, session_id: str | None = None) -> str:
    """A container name engines accept: `gpud-s-<session>` for a session worker, else `gpud-t-<task>`."""
    ident = f"s-{session_id}" if session_id else f"t-{task_id}"
    return "gpud-" + _NAME_UNSAFE.sub("_", ident)[:100]


def gpu_env(gpu: GpuDevice | None) -> dict[str, str]:
    """The GPU environment every worker gets, attached device or not."""
    if gpu is None:
        # No GPU for this worker: hide every device from CUDA rather than leaving all visible.
        return {"NVIDIA_VISIBLE_DEVICES": "void", "CUDA_VISIBLE_DEVICES": "", "GPUD_GPU_ID": ""}
    # The uuid works both on the host (process runtime) and inside a container that sees only this GPU.
    return {"NVIDIA_VISIBLE_DEVICES": gpu.uuid, "CUDA_VISIBLE_DEVICES": gpu.uuid, "GPUD_GPU_ID": gpu.gpu_id}


def gpud_labels(
    preset: Preset, task_id: str, session_id: str | None, gpu: GpuDevice | None, user: str
) -> dict[str, str]:
    """The labels that identify a gpud worker (and the uid it holds), so it can be found again after a restart."""
    labels = {
        LABEL_MANAGED: "true",
        LABEL_TASK: task_id,
        LABEL_MODEL: preset.model_id,
        LABEL_PRESET: preset.name,
        LABEL_UID: user.partition(":")[0],
    }
    if session_id:
        labels[LABEL_SESSION] = session_id
    if gpu is not None:
        labels[LABEL_GPU] = gpu.uuid
    return labels


def build_spec(
    preset: Preset,
    *,
    user: str,
    task_id: str,
    session_id: str | None = None,
    gpu: GpuDevice | None = None,
    model_dir: Path | str | None = None,
    mounts: Iterable[Mount] = (),
    env: Mapping[str, str] | None = None,
    name: str | None = None,
    stop_grace_seconds: float = 10.0,
) -> ContainerSpec:
    """The hardened spec for one worker running as `user` (`uid:gid`, resolved by gpud from the preset and its
    worker uid range); gpud's own env wins over the preset's, `env` wins over both."""
    all_mounts: list[Mount] = []
    full_env: dict[str, str] = dict(preset.env)
    if model_dir is not None:
        all_mounts.append(Mount(source=str(model_dir), target=MODELS_PATH, read_only=True))
        full_env["MODEL_PATH"] = MODELS_PATH
    all_mounts.extend(mounts)
    full_env.update(gpu_env(gpu))
    full_env.update(
        {
            "GPUD_TASK_ID": task_id,
            "GPUD_SESSION_ID": session_id or "",
            "GPUD_MODEL_ID": preset.model_id,
            "GPUD_PRESET": preset.name,
        }
    )
    full_env.update(env or {})
    return ContainerSpec(
        image=preset.image,
        command=tuple(preset.command),
        name=name or container_name(task_id, session_id),
        env=full_env,
        labels=gpud_labels(preset, task_id, session_id, gpu, user),
        mounts=tuple(all_mounts),
        limits=preset.limits,
        gpu=gpu,
        user=user,
        stop_grace_seconds=stop_grace_seconds,
    )
