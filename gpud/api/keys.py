"""Typed keys under which each service sits on the aiohttp applications: a route takes only what it uses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gpud.gpu.inventory import GpuInventory
from gpud.gpu.scheduler import Scheduler
from gpud.metrics import Metrics
from gpud.modelstore import ModelStore
from gpud.runtime.base import ContainerRuntime
from gpud.settings import LiveConfig
from gpud.work.service import TaskService
from gpud.work.sessions.manager import SessionManager

# Re-reads settings and presets and answers with what changed (the daemon's reload; absent in test stacks).
ReloadFunction = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class ProcessStart:
    """When the daemon started: epoch seconds for reports, a monotonic reading for uptime."""

    wall: float
    monotonic: float


CONFIG: web.AppKey[LiveConfig] = web.AppKey("config", LiveConfig)
INVENTORY: web.AppKey[GpuInventory] = web.AppKey("inventory", GpuInventory)
SCHEDULER: web.AppKey[Scheduler] = web.AppKey("scheduler", Scheduler)
RUNTIME: web.AppKey[ContainerRuntime] = web.AppKey("runtime", ContainerRuntime)
MODEL_STORE: web.AppKey[ModelStore] = web.AppKey("model_store", ModelStore)
TASKS: web.AppKey[TaskService] = web.AppKey("tasks", TaskService)
SESSIONS: web.AppKey[SessionManager] = web.AppKey("sessions", SessionManager)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
STARTED: web.AppKey[ProcessStart] = web.AppKey("started", ProcessStart)
RELOAD: web.AppKey[ReloadFunction | None] = web.AppKey("reload")
# Whether responses may name who holds a GPU (session and task ids): the admin app yes, the public app no.
NAMES_HOLDERS: web.AppKey[bool] = web.AppKey("names_holders", bool)
