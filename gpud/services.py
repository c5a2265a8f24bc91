"""The bundle of long-lived services the composition root builds and both web apps share."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpud.config import Settings
from gpud.gpus import GpuInventory, open_inventory
from gpud.metrics import Metrics
from gpud.modelstore import ModelStore
from gpud.oneoff import OneOffRunner
from gpud.presets import PresetCatalog, load_presets
from gpud.runtime import make_runtime
from gpud.runtime.base import ContainerRuntime
from gpud.scheduler import Scheduler
from gpud.session_manager import SessionManager
from gpud.session_worker import install_sdk
from gpud.sessions import SessionRegistry
from gpud.tasks import TaskRegistry
from gpud.taskservice import TaskService
from gpud.worker import sdk_source_path

if TYPE_CHECKING:
    from gpud.daemon import Reloader


@dataclass
class Services:
    """Everything a request handler may use. `settings` and `presets` are replaced whole on reload."""

    settings: Settings
    presets: PresetCatalog
    inventory: GpuInventory
    scheduler: Scheduler
    metrics: Metrics
    runtime: ContainerRuntime
    models: ModelStore
    tasks: TaskService
    reloader: Reloader | None = None
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    background: list[asyncio.Task[None]] = field(default_factory=list)

    def task_registry(self) -> TaskRegistry:
        """Every known task (for metrics)."""
        return self.tasks.registry

    def session_registry(self) -> SessionRegistry:
        """Every known session (for metrics)."""
        return self.tasks.sessions.registry

    def uptime(self) -> float:
        """Seconds since the daemon started."""
        return time.monotonic() - self.started_monotonic

    async def start(self) -> None:
        """Prepare directories, install the worker SDK, clean the model cache's leftovers."""
        state_dir = self.settings.state_dir
        await asyncio.get_running_loop().run_in_executor(None, _prepare_state_dir, state_dir)
        await self.models.start()
        self.background = [
            asyncio.create_task(self.inventory.refresh_forever(self.settings.gpu_metrics_refresh_interval)),
            asyncio.create_task(self.tasks.janitor()),
        ]

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
        # Workers run as another user and must reach their own socket/input directories below these.
        (state_dir / sub).chmod(0o711)
    state_dir.chmod(0o711)
    install_sdk(sdk_source_path(), state_dir / "sdk")


def create_services(settings: Settings, nvml: Any = None) -> Services:
    """Construct every service from settings (reads the presets file, may load NVML); start() comes after."""
    presets = load_presets(settings.presets_file)
    inventory = open_inventory(settings.gpu_backend, settings.gpu_device_ids, settings.gpu_device_difficulty, nvml=nvml)
    scheduler = Scheduler(inventory)
    runtime = make_runtime(settings.runtime, settings.runtime_socket)
    models = ModelStore(
        settings.model_cache_dir,
        file_service_url=settings.file_service_url,
        internal_key=settings.file_service_internal_key,
        auto_fetch=settings.auto_fetch_models,
        max_bytes=settings.model_cache_max_bytes,
        key_header=settings.file_service_key_header,
    )
    holder: dict[str, Services] = {}

    def current_settings() -> Settings:
        return holder["services"].settings  # reload swaps Services.settings; readers always see the new one

    state = settings.state_dir
    sessions = SessionManager(runtime, models, scheduler, current_settings, state / "sessions", state / "sdk")
    oneoff = OneOffRunner(runtime, models, scheduler, settings.state_dir / "tasks")
    metrics = Metrics()
    tasks = TaskService(
        current_settings, lambda: holder["services"].presets, runtime, models, scheduler, oneoff, sessions, metrics
    )
    services = Services(settings, presets, inventory, scheduler, metrics, runtime, models, tasks)
    holder["services"] = services
    metrics.watch(services)
    return services
