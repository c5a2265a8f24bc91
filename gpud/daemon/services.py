"""Building the long-lived services from settings, starting their background work, and closing them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpud.api.app import AppServices
from gpud.api.keys import ProcessStart, ReloadFunction
from gpud.daemon.examples import prepare_process_host, process_image_dirs
from gpud.daemon.gpu_metrics import GpuCollector
from gpud.daemon.state_metrics import StateCollector
from gpud.gpu.drains import DrainFile, restore_drains
from gpud.gpu.health import GpuHealth
from gpud.gpu.inventory import GpuInventory, open_inventory
from gpud.gpu.scheduler import Lease, ReleaseObserver, Scheduler
from gpud.metrics import Metrics
from gpud.modelstore import ModelStore
from gpud.modelstore.config import archive_limits, fetch_pace
from gpud.runtime import make_runtime
from gpud.runtime.base import ContainerRuntime
from gpud.runtime.instance import InstanceRuntime
from gpud.settings import LiveConfig, Settings
from gpud.settings.presets import load_presets
from gpud.state import instance_id
from gpud.work.capacity import Capacity
from gpud.work.hostparts import HostParts
from gpud.work.journal import Journal
from gpud.work.oneoff import OneOffRunner
from gpud.work.removals import PendingRemovals
from gpud.work.restore import Restorer
from gpud.work.service import TaskService
from gpud.work.sessions.manager import SessionManager
from gpud.work.uids import WorkerIds
from gpud.worker.install import install_sdk

if TYPE_CHECKING:
    from gpud.fleet.service import Fleet


# How often the engine is pinged for gpud_engine_up (milliseconds each).
ENGINE_PROBE_SECONDS = 5.0


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
    health: GpuHealth | None = None  # the GPU health policy, run after each NVML refresh
    fleet: Fleet | None = None  # fleet mode only (GPUD_ETCD_ENDPOINTS): gpud/fleet
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
            fleet=self.fleet,
        )

    async def start(self) -> None:
        """Prepare directories, install the worker SDK, open the records, clean the model cache's leftovers,
        reconcile with what survived the last exit (before anything is leased), start background loops."""
        await asyncio.get_running_loop().run_in_executor(None, _prepare_state_dir, self.settings.state_dir)
        # Drains from before the restart hold before anything is leased (restore, reconcile, serving); from here
        # on each drain change rewrites the file. A few hundred bytes, read once: on the loop, nothing else runs yet.
        restore_drains(DrainFile(self.settings.state_dir), self.inventory, self.scheduler)
        await asyncio.get_running_loop().run_in_executor(None, self.journal.open, self.settings.state_dir)
        if self.settings.runtime == "process":  # the example workers, where the packaged presets find them
            await asyncio.to_thread(prepare_process_host, self.settings.state_dir, self.settings.model_cache_dir)
        await self.models.start()
        self.restorer.load()
        reconciled = await self.restorer.first_try()
        self.background = [
            asyncio.create_task(
                self.inventory.refresh_forever(
                    lambda: self.settings.gpu_metrics_refresh_interval,
                    after=self.health.check if self.health is not None else None,
                )
            ),
            asyncio.create_task(self.tasks.janitor()),
            asyncio.create_task(_watch_engine(self.runtime)),
        ]
        if not reconciled:
            self.background.append(asyncio.create_task(self.restorer.reconcile_until_done()))
        if self.fleet is not None:
            await self.fleet.start()  # returns at once: an unreachable etcd leaves this host serving its own work

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
        self.metrics.know_models(preset.model_id for preset in self.config.presets.all())

    async def close(self) -> None:
        """End tasks and sessions, then release the engine client, the model store and NVML."""
        if self.fleet is not None:
            await self.fleet.close()  # leave the fleet first: no host forwards here any more
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


async def _watch_engine(runtime: ContainerRuntime) -> None:
    """Forever: ask the engine's health (a ping) now and then, so gpud_engine_up follows it while no work runs."""
    while True:
        await runtime.health()
        await asyncio.sleep(ENGINE_PROBE_SECONDS)


def _count_gpu_time(metrics: Metrics) -> ReleaseObserver:
    """The scheduler's release observer: a task's or session's lease time goes to gpud_gpu_seconds_total."""

    def released(lease: Lease, seconds: float) -> None:
        if lease.kind in ("task", "session"):  # not a GPU held for a leftover container until its removal
            metrics.gpu_used(lease.model or "unknown", lease.gpu.difficulty, seconds)

    return released


def create_services(settings: Settings, nvml: Any = None) -> Services:
    """Construct every service from settings (reads the presets file, may load NVML); start() comes after."""
    config = LiveConfig(settings, load_presets(settings.presets_file))
    inventory = open_inventory(settings.gpu_backend, settings.gpu_device_ids, settings.gpu_device_difficulty, nvml=nvml)
    metrics = Metrics(settings.metrics_created_series)
    metrics.know_models(preset.model_id for preset in config.presets.all())
    scheduler = Scheduler(inventory, on_release=_count_gpu_time(metrics))
    options: dict[str, Any] = {"on_pull": metrics.image_pulled}
    if settings.runtime == "process":
        options = {
            "allow_unisolated": settings.process_runtime_allow_unisolated,
            "image_dirs": process_image_dirs(settings.state_dir),
        }
    # Every container carries this gpud's instance id, and only those are listed (so adopted or removed at start).
    engine = make_runtime(settings.runtime, settings.runtime_socket, **options)
    runtime = InstanceRuntime(engine, instance_id(settings.state_dir), metrics)
    models = ModelStore(
        settings.model_cache_dir,
        file_service_url=settings.file_service_url,
        internal_key=settings.file_service_internal_key,
        auto_fetch=settings.auto_fetch_models,
        max_bytes=settings.model_cache_max_bytes,
        key_header=settings.file_service_key_header,
        limits=archive_limits(settings),
        pace=fetch_pace(settings),
        metrics=metrics,
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
        metrics=metrics,
    )
    # One place leases GPUs to new work (submit, and one-offs after their model fetch): it may end an idle session.
    capacity = Capacity(scheduler, sessions, config, metrics)
    oneoff = OneOffRunner(runtime, models, scheduler, state / "tasks", ids, removals, acquire=capacity.acquire)
    tasks = TaskService(
        config, runtime, models, scheduler, oneoff, sessions, metrics, journal, removals=removals, capacity=capacity
    )
    metrics.watch(StateCollector(tasks.registry, sessions.registry, models))
    health = GpuHealth(inventory, scheduler)
    health.check()  # the first sample (taken when NVML opened): uncorrectable ECC errors drain before any lease
    metrics.watch(GpuCollector(inventory, scheduler, health))
    restorer = Restorer(HostParts(config, inventory, scheduler, models, ids), runtime, journal, tasks, oneoff, state)
    fleet = None
    if settings.etcd_endpoints:  # fleet mode: imported only then (no etcd cost on a single host)
        from gpud.fleet.service import Fleet, FleetConfig

        fleet = Fleet(FleetConfig.from_settings(settings), inventory, scheduler, tasks, metrics)
    return Services(
        config, inventory, scheduler, metrics, runtime, models, sessions, tasks, journal, restorer, health=health,
        fleet=fleet,
    )  # fmt: skip
