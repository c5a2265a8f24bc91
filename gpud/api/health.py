"""The daemon's health report, shared by `/health` on both apps (and so by `gpuctl status`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gpud import __version__
from gpud.api import keys
from gpud.gpu.inventory import Gpu, GpuInventory
from gpud.gpu.scheduler import Scheduler
from gpud.runtime.base import EngineHealth

# Fleet mode's part of the report and why the host is degraded (None: it is not); absent on a single host.
FleetHealth = Callable[[], tuple[dict[str, Any], str | None]]
# Set by gpud/api/fleet.py in fleet mode only: health never imports the fleet code.
FLEET_HEALTH: web.AppKey[FleetHealth] = web.AppKey("fleet_health")


def gpu_report(inventory: GpuInventory, scheduler: Scheduler, gpu: Gpu, holders: bool = True) -> dict[str, Any]:
    """One GPU: identity, tag, latest sample, health, lease and drain state. With `holders` false (the public app)
    the lease says only its kind and age: a session or task id would let anyone who reads /health address it."""
    sample = inventory.sample(gpu.index)
    lease = scheduler.lease_of(gpu.index)
    leased_to: dict[str, Any] | None = None
    if lease is not None:
        leased_to = {"kind": lease.kind, "since": lease.acquired_at}
        if holders:
            leased_to["id"] = lease.holder
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
        "ecc_errors": {
            "corrected": sample.ecc_corrected if sample else None,
            "uncorrected": sample.ecc_uncorrected if sample else None,
        },
        "throttle_reasons": list(sample.throttle_reasons) if sample and sample.throttle_reasons is not None else None,
        "xid_errors": inventory.xid_count(gpu.index),
        "last_xid": inventory.last_xid(gpu.index),
        "error": sample.error if sample else None,
        "healthy": scheduler.is_healthy(gpu.index) and not (sample and sample.error),
        "leased": lease is not None,
        "leased_to": leased_to,
        "drained": scheduler.is_drained(gpu.index),
        "drain_reason": scheduler.drain_reason(gpu.index),
    }


def gpu_reports(app: web.Application) -> list[dict[str, Any]]:
    """Every GPU of the app's inventory; lease holders only where the app may name them (admin)."""
    inventory, scheduler = app[keys.INVENTORY], app[keys.SCHEDULER]
    return [gpu_report(inventory, scheduler, gpu, app[keys.NAMES_HOLDERS]) for gpu in inventory.gpus]


def health_report(app: web.Application, engine: EngineHealth) -> dict[str, Any]:
    """status ok/degraded with the reasons, version, uptime, GPUs, and activity counts."""
    inventory = app[keys.INVENTORY]
    started = app[keys.STARTED]
    reasons = [f"GPU {index}: {error}" for index, error in sorted(inventory.unhealthy().items())]
    scheduler = app[keys.SCHEDULER]
    reasons += [
        f"GPU {gpu.index} unhealthy: {scheduler.drain_reason(gpu.index)} (drained until undrained)"
        for gpu in inventory.gpus
        if not scheduler.is_healthy(gpu.index)
    ]
    if not engine.ok:
        reasons.append(f"{engine.runtime} engine unreachable: {engine.detail}")
    if engine.degraded:
        reasons.append(engine.degraded)
    fleet = app.get(FLEET_HEALTH)
    fleet_part, fleet_reason = fleet() if fleet is not None else (None, None)
    if fleet_reason:
        reasons.append(fleet_reason)
    report = {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - started.monotonic, 3),
        "started_at": started.wall,
        "gpu_backend": inventory.backend,
        "runtime": {
            "name": engine.runtime,
            "reachable": engine.ok,
            "isolated": engine.isolated,
            "version": engine.version,
            "detail": engine.detail,
        },
        "gpus": gpu_reports(app),
        "active_tasks": len(app[keys.TASKS].registry.active()),
        "active_sessions": len(app[keys.SESSIONS].registry.live()),
    }
    if fleet_part is not None:
        report["fleet"] = fleet_part
    return report
