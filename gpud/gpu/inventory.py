"""GPU inventory and health: NVIDIA's NVML through pynvml, or a static list declared in configuration.

The static backend is how machines without NVIDIA GPUs (CI, laptops) run gpud: GPUs are declared by
`GPU_DEVICE_IDS`, nothing is attached to workers, and no utilisation is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from gpud.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_DIFFICULTY = "low"


@dataclass(frozen=True)
class Gpu:
    """One GPU's identity; `real` is False for statically declared GPUs (nothing to attach)."""

    index: int
    uuid: str
    name: str
    difficulty: str
    real: bool


@dataclass(frozen=True)
class GpuSample:
    """One reading of a GPU's counters (None where the backend cannot tell)."""

    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization_percent: int | None = None
    temperature_c: int | None = None
    power_watts: float | None = None
    sampled_at: float = 0.0
    error: str | None = None


class NvmlReader:
    """Reads identities and samples through a pynvml-compatible module (the real one, or a stand-in in tests)."""

    def __init__(self, nvml: ModuleType | Any) -> None:
        self._nvml = nvml

    def open(self) -> int:
        """Initialise NVML and return the device count; raises whatever NVML raises."""
        self._nvml.nvmlInit()
        return int(self._nvml.nvmlDeviceGetCount())

    def close(self) -> None:
        """Shut NVML down (errors are logged, not raised: this runs at shutdown)."""
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:  # NVML's own error classes; nothing to do at shutdown
            logger.debug("nvmlShutdown failed: %s", exc)

    def identity(self, index: int) -> tuple[str, str]:
        """(uuid, name) of the GPU at index."""
        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        return _text(self._nvml.nvmlDeviceGetUUID(handle)), _text(self._nvml.nvmlDeviceGetName(handle))

    def sample(self, index: int) -> GpuSample:
        """Memory, utilisation, temperature and power of the GPU at index."""
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
            temperature = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            power = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        except Exception as exc:  # NVMLError subclasses: a lost GPU, a driver problem
            return GpuSample(sampled_at=time.time(), error=str(exc) or type(exc).__name__)
        return GpuSample(
            memory_total_bytes=int(memory.total),
            memory_used_bytes=int(memory.used),
            utilization_percent=int(utilization.gpu),
            temperature_c=int(temperature),
            power_watts=power,
            sampled_at=time.time(),
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(read: Any) -> Any:
    """Some counters are unsupported on some boards; treat those as unknown."""
    try:
        return read()
    except Exception:
        return None


class GpuInventory:
    """The GPUs gpud manages, their difficulty tags and their latest samples."""

    def __init__(self, gpus: list[Gpu], backend: str, reader: NvmlReader | None = None) -> None:
        self.gpus = gpus
        self.backend = backend
        self._reader = reader
        self._samples: dict[int, GpuSample] = {}
        self._interval_changed: asyncio.Event | None = None

    def get(self, index: int) -> Gpu | None:
        """The GPU with this index, if managed."""
        return next((gpu for gpu in self.gpus if gpu.index == index), None)

    def sample(self, index: int) -> GpuSample | None:
        """The latest sample for a GPU (None before the first refresh or on the static backend)."""
        return self._samples.get(index)

    def retag(self, difficulty: Mapping[int, str]) -> None:
        """Apply new difficulty tags (on reload); GPUs not named keep the default tag."""
        self.gpus = [
            Gpu(g.index, g.uuid, g.name, difficulty.get(g.index, DEFAULT_DIFFICULTY), g.real) for g in self.gpus
        ]

    def unhealthy(self) -> dict[int, str]:
        """GPUs whose last sample failed, with the reason."""
        return {i: s.error for i, s in self._samples.items() if s.error}

    def refresh(self) -> None:
        """Sample every GPU now (blocking: NVML calls; run it in an executor)."""
        if self._reader is None:
            return
        for gpu in self.gpus:
            self._samples[gpu.index] = self._reader.sample(gpu.index)

    async def refresh_forever(self, interval: Callable[[], float]) -> None:
        """Refresh samples until cancelled, waiting `interval()` seconds between (read each time: reloadable)."""
        loop = asyncio.get_running_loop()
        self._interval_changed = asyncio.Event()
        while True:
            await loop.run_in_executor(None, self.refresh)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interval_changed.wait(), interval())
            self._interval_changed.clear()

    def interval_changed(self) -> None:
        """Cut the current wait short, so a reloaded GPU_METRICS_REFRESH_INTERVAL applies from now."""
        if self._interval_changed is not None:
            self._interval_changed.set()

    def close(self) -> None:
        """Release NVML."""
        if self._reader is not None:
            self._reader.close()


def open_inventory(
    backend: str,
    device_ids: tuple[int, ...],
    difficulty: Mapping[int, str],
    nvml: ModuleType | Any | None = None,
) -> GpuInventory:
    """Build the inventory for the configured backend; `auto` falls back to static when NVML does not load."""
    if backend in {"auto", "nvml"}:
        try:
            module = nvml if nvml is not None else _import_pynvml()
            return _open_nvml(NvmlReader(module), device_ids, difficulty)
        except ConfigError:
            raise
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            if backend == "nvml":
                raise ConfigError([f"gpu_backend: nvml: NVML did not load: {exc}"]) from exc
            logger.warning("NVML did not load (%s); falling back to the static GPU backend", exc)
            device_ids = device_ids or _fallback_ids(difficulty)
    if not device_ids:
        raise ConfigError(["gpu_device_ids: the static GPU backend needs GPU_DEVICE_IDS: declare the GPUs (e.g. 0,1)"])
    gpus = [
        Gpu(i, f"GPU-static-{i}", f"static GPU {i}", difficulty.get(i, DEFAULT_DIFFICULTY), real=False)
        for i in device_ids
    ]
    logger.info("static GPU backend: %s", ", ".join(f"{g.index}:{g.difficulty}" for g in gpus))
    return GpuInventory(gpus, backend="static")


def _fallback_ids(difficulty: Mapping[int, str]) -> tuple[int, ...]:
    """GPUs to declare when `auto` finds no NVML and none were named: those tagged, else GPU 0.

    So a configuration that leaves GPU_DEVICE_IDS to NVML (the shipped one) still starts on a host without NVIDIA's
    driver, as a static GPU that attaches nothing; `gpu_backend: nvml` refuses to start instead.
    """
    ids = tuple(sorted(difficulty)) or (0,)
    logger.warning(
        "no GPU_DEVICE_IDS either: declaring static GPU(s) %s (set gpu_device_ids to choose, or gpu_backend: nvml "
        "to refuse to start without NVML)",
        ",".join(map(str, ids)),
    )
    return ids


def _import_pynvml() -> ModuleType:
    import pynvml

    return pynvml


def _open_nvml(reader: NvmlReader, device_ids: tuple[int, ...], difficulty: Mapping[int, str]) -> GpuInventory:
    count = reader.open()
    wanted = device_ids or tuple(range(count))
    missing = [i for i in wanted if i >= count]
    if missing:
        reader.close()
        raise ConfigError([f"gpu_device_ids: GPU(s) {missing} do not exist: NVML sees {count} GPU(s)"])
    unknown = sorted(set(difficulty) - set(wanted))
    if unknown:
        reader.close()
        raise ConfigError([f"gpu_device_difficulty: GPU(s) {unknown} are not managed (have {list(wanted)})"])
    gpus = []
    for index in wanted:
        uuid, name = reader.identity(index)
        gpus.append(Gpu(index, uuid, name, difficulty.get(index, DEFAULT_DIFFICULTY), real=True))
    inventory = GpuInventory(gpus, backend="nvml", reader=reader)
    inventory.refresh()
    logger.info("NVML GPU backend: %s", ", ".join(f"{g.index}:{g.name}:{g.difficulty}" for g in gpus))
    return inventory
