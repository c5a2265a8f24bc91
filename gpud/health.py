"""The daemon's health report, shared by `/health` on both apps and by gpuctl status."""

from __future__ import annotations

from typing import Any

from gpud import __version__
from gpud.gpus import Gpu
from gpud.runtime.base import EngineHealth
from gpud.services import Services


def gpu_report(services: Services, gpu: Gpu) -> dict[str, Any]:
    """One GPU: identity, tag, latest sample, lease and drain state."""
    sample = services.inventory.sample(gpu.index)
    lease = services.scheduler.lease_of(gpu.index)
    return {
        "id": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "difficulty": gpu.difficulty,
        "real": gpu.real,
        "memory": {
            "total_bytes": sample.memory_total_bytes if sample else None,
            "used_bytes": sample.memory_used_bytes if sample else None,
        },
        "utilization_percent": sample.utilization_percent if sample else None,
        "temperature_c": sample.temperature_c if sample else None,
        "power_watts": sample.power_watts if sample else None,
        "error": sample.error if sample else None,
        "leased": lease is not None,
        "leased_to": {"kind": lease.kind, "id": lease.holder, "since": lease.acquired_at} if lease else None,
        "drained": services.scheduler.is_drained(gpu.index),
    }


def health_report(services: Services, engine: EngineHealth) -> dict[str, Any]:
    """status ok/degraded with the reasons, version, uptime, GPUs, and activity counts."""
    reasons = [f"GPU {index}: {error}" for index, error in sorted(services.inventory.unhealthy().items())]
    if not engine.ok:
        reasons.append(f"{engine.runtime} engine unreachable: {engine.detail}")
    return {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "version": __version__,
        "uptime_seconds": round(services.uptime(), 3),
        "started_at": services.started_at,
        "gpu_backend": services.inventory.backend,
        "runtime": {
            "name": engine.runtime,
            "reachable": engine.ok,
            "isolated": engine.isolated,
            "version": engine.version,
            "detail": engine.detail,
        },
        "gpus": [gpu_report(services, gpu) for gpu in services.inventory.gpus],
        **services.tasks.counts(),
    }
