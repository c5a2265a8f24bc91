"""Building the long-lived services from settings, starting their background work, and closing them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpud.api.app import AppServices
from gpud.api.keys import ProcessStart, ReloadFunction
from gpud.daemon.state_metrics import StateCollector
from gpud.gpu.inventory import GpuInventory, open_inventory
from gpud.gpu.scheduler import Scheduler
from gpud.metrics import Metrics
from gpud.modelstore import ModelStore
from gpud.modelstore.config import archive_limits, fetch_pace
from gpud.runtime import make_runtime
from gpud.runtime.base import ContainerRuntime
from gpud.settings import LiveConfig, Settings
from gpud.settings.presets import load_presets
from gpud.work.oneoff import OneOffRunner
from gpud.work.service import TaskService
from gpud.work.sessions.manager import SessionManager
from gpud.work.uids import WorkerIds
from gpud.worker.install import install_sdk


@dataclass
class Services:
    """The daemon's services. The composition root owns them; the apps get each under its own key."""

    config: LiveConfig
    inventory: GpuInventory
    scheduler: Scheduler
    metrics: Metrics
    runtime: ContainerRuntime
    models: ModelStore
    sessions: SessionManager
    tasks: TaskService
    started: ProcessStart = field(default_factory=lambda: ProcessStart(time.time(), time.monotonic()))
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        """The settings in force now."""
        return self.config.settings

    def for_api(self, reload: ReloadFunction | None = None) -> AppServices:
        """What the web apps serve from."""
        return AppServices(
            config=self.config,
            inventory=self.inventory,
            scheduler=self.scheduler,
            runtime=self.runtime,
            models=self.models,
            tasks=self.tasks,
            sessions=self.sessions,
            metrics=self.metrics,
            started=self.started,
            reload=reload,
        )

    async def start(self) -> None:
        """Prepare directories, install the worker SDK, clean the model cache's leftovers, start background loops."""
        await asyncio.get_running_loop().run_in_executor(None, _prepare_state_dir, self.settings.state_dir)
        await self.models.start()
        self.background = [
            asyncio.create_task(self.inventory.refresh_forever(lambda: self.settings.gpu_metrics_refresh_interval)),
            asyncio.create_task(self.tasks.janitor()),
        ]

    def apply_settings(self, changed: list[str]) -> None:
        """Make reloaded settings take effect in the services that copied them at start."""
        settings = self.settings
        if "gpu_device_difficulty" in changed:
            self.inventory.retag(settings.gpu_device_difficulty)
        if "gpu_metrics_refresh_interval" in changed:
            self.inventory.interval_changed()
        self.models.configure(
            file_service_url=settings.file_service_url,
            internal_key=settings.file_service_internal_key,
            key_header=settings.file_service_key_header,
            auto_fetch=settings.auto_fetch_models,
            limits=archive_limits(settings),
            pace=fetch_pace(settings),
        )
        self.sessions.settings_changed()

    async def close(self) -> None:
        """End tasks and sessions, then release the engine client, the model store and NVML."""
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.tasks.shutdown()
        await self.models.close()
        await self.runtime.close()
        self.inventory.close()


def _prepare_state_dir(state_dir: Path) -> None:
    for sub in ("sessions", "tasks"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
        # Traversable, not listable: each worker reaches only its own directory below, which is 0700 and
        # owned by the worker's uid (gpud/work/uids.py); other users can neither list nor enter.
        (state_dir / sub).chmod(0o711)
    state_dir.chmod(0o711)
    install_sdk(state_dir / "sdk")


def create_services(settings: Settings, nvml: Any = None) -> Services:
    """Construct every service from settings (reads the presets file, may load NVML); start() comes after."""
    config = LiveConfig(settings, load_presets(settings.presets_file))
    inventory = open_inventory(settings.gpu_backend, settings.gpu_device_ids, settings.gpu_device_difficulty, nvml=nvml)
    scheduler = Scheduler(inventory)
    options = {"allow_unisolated": settings.process_runtime_allow_unisolated} if settings.runtime == "process" else {}
    runtime = make_runtime(settings.runtime, settings.runtime_socket, **options)
    models = ModelStore(
        settings.model_cache_dir,
        file_service_url=settings.file_service_url,
        internal_key=settings.file_service_internal_key,
        auto_fetch=settings.auto_fetch_models,
        max_bytes=settings.model_cache_max_bytes,
        key_header=settings.file_service_key_header,
        limits=archive_limits(settings),
        pace=fetch_pace(settings),
    )
    state = settings.state_dir
    # One allocator for both: a session and a one-off must never share a uid.
    ids = WorkerIds(*settings.worker_uid_range)
    sessions = SessionManager(runtime, models, scheduler, config, state / "sessions", state / "sdk", ids=ids)
    oneoff = OneOffRunner(runtime, models, scheduler, state / "tasks", ids)
    metrics = Metrics()
    tasks = TaskService(config, runtime, models, scheduler, oneoff, sessions, metrics)
    metrics.watch(StateCollector(inventory, scheduler, tasks.registry, sessions.registry))
    return Services(config, inventory, scheduler, metrics, runtime, models, sessions, tasks)
