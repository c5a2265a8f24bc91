"""Building the long-lived services from settings, starting their background work, and closing them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpud.api.app import AppServices
from gpud.api.keys import ProcessStart, ReloadFunction
from gpud.daemon.examples import prepare_process_host, process_image_dirs
from gpud.daemon.state_metrics import StateCollector
from gpud.gpu.inventory import GpuInventory, open_inventory
from gpud.gpu.scheduler import Scheduler
from gpud.metrics import Metrics
from gpud.modelstore import ModelStore
from gpud.modelstore.config import archive_limits, fetch_pace
from gpud.runtime import make_runtime
from gpud.runtime.base import ContainerRuntime
from gpud.runtime.instance import InstanceRuntime
from gpud.settings import LiveConfig, Settings
from gpud.settings.presets import load_presets
from gpud.state import instance_id
from gpud.work.journal import Journal
from gpud.work.oneoff import OneOffRunner
from gpud.work.removals import PendingRemovals
from gpud.work.restore import Restorer
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
    journal: Journal
    restorer: Restorer
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
        """Prepare directories, install the worker SDK, open the records, clean the model cache's leftovers,
        reconcile with what survived the last exit (before anything is leased), start background loops."""
        await asyncio.get_running_loop().run_in_executor(None, _prepare_state_dir, self.settings.state_dir)
        await asyncio.get_running_loop().run_in_executor(None, self.journal.open, self.settings.state_dir)
        if self.settings.runtime == "process":  # the example workers, where the packaged presets find them
            await asyncio.to_thread(prepare_process_host, self.settings.state_dir, self.settings.model_cache_dir)
        await self.models.start()
        self.restorer.load()
        reconciled = await self.restorer.first_try()
        self.background = [
            asyncio.create_task(self.inventory.refresh_forever(lambda: self.settings.gpu_metrics_refresh_interval)),
            asyncio.create_task(self.tasks.janitor()),
        ]
        if not reconciled:
            self.background.append(asyncio.create_task(self.restorer.reconcile_until_done()))

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
        self.journal.close()  # after the shutdown above has recorded how everything ended
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
    options: dict[str, Any] = {}
    if settings.runtime == "process":
        options = {
            "allow_unisolated": settings.process_runtime_allow_unisolated,
            "image_dirs": process_image_dirs(settings.state_dir),
        }
    # Every container carries this gpud's instance id, and only those are listed (so adopted or removed at start).
    engine = make_runtime(settings.runtime, settings.runtime_socket, **options)
    runtime = InstanceRuntime(engine, instance_id(settings.state_dir))
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
    journal = Journal(lambda: config.settings.record_retention_seconds)
    # One list of containers the engine would not remove yet, retried by the task service's janitor.
    removals = PendingRemovals(runtime)
    sessions = SessionManager(
        runtime,
        models,
        scheduler,
        config,
        state / "sessions",
        state / "sdk",
        ids=ids,
        records=journal,
        removals=removals,
    )
    oneoff = OneOffRunner(runtime, models, scheduler, state / "tasks", ids, removals)
    metrics = Metrics()
    tasks = TaskService(config, runtime, models, scheduler, oneoff, sessions, metrics, journal, removals=removals)
    metrics.watch(StateCollector(inventory, scheduler, tasks.registry, sessions.registry))
    restorer = Restorer(config, runtime, inventory, scheduler, models, ids, journal, tasks, oneoff, state)
    return Services(config, inventory, scheduler, metrics, runtime, models, sessions, tasks, journal, restorer)
