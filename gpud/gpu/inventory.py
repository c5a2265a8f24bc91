"""GPU inventory: NVIDIA's NVML through pynvml (read by gpud/gpu/nvml.py), or a static list from configuration.

The static backend is how machines without NVIDIA GPUs (CI, laptops) run gpud: GPUs are declared by
`GPU_DEVICE_IDS`, nothing is attached to workers, and no utilisation is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from gpud.errors import ConfigError
from gpud.gpu.nvml import GpuSample, NvmlReader

__all__ = ["DEFAULT_DIFFICULTY", "Gpu", "GpuInventory", "GpuSample", "NvmlReader", "open_inventory"]

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


class GpuInventory:
    """The GPUs gpud manages, their difficulty tags and their latest samples."""

    def __init__(self, gpus: list[Gpu], backend: str, reader: NvmlReader | None = None) -> None:
        self.gpus = gpus
        self.backend = backend
        self._reader = reader
        self._samples: dict[int, GpuSample] = {}
        self._interval_changed: asyncio.Event | None = None
        self._xid_counts: dict[int, int] = {}
        self._last_xid: dict[int, int] = {}
        self._new_xids: list[tuple[int, int]] = []  # (GPU index, XID) not yet taken by take_xids()
        self._xid_lock = threading.Lock()  # refresh() runs in an executor thread, take_xids() on the event loop

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

    def xid_count(self, index: int) -> int:
        """XID events seen on a GPU since gpud started."""
        return self._xid_counts.get(index, 0)

    def last_xid(self, index: int) -> int | None:
        """The latest XID seen on a GPU, if any."""
        return self._last_xid.get(index)

    def take_xids(self) -> list[tuple[int, int]]:
        """(GPU index, XID) events seen since the last call, oldest first."""
        with self._xid_lock:
            taken, self._new_xids = self._new_xids, []
        return taken

    def refresh(self) -> None:
        """Sample every GPU and collect its pending XID events now (blocking: NVML calls; run it in an executor)."""
        if self._reader is None:
            return
        for gpu in self.gpus:
            self._samples[gpu.index] = self._reader.sample(gpu.index)
            xids = self._reader.xids(gpu.index)
            if xids:
                with self._xid_lock:
                    self._xid_counts[gpu.index] = self._xid_counts.get(gpu.index, 0) + len(xids)
                    self._last_xid[gpu.index] = xids[-1]
                    self._new_xids.extend((gpu.index, xid) for xid in xids)

    async def refresh_forever(self, interval: Callable[[], float], after: Callable[[], None] | None = None) -> None:
        """Refresh samples until cancelled, waiting `interval()` seconds between (read each time: reloadable);
        `after` runs on the event loop after each refresh (the health check)."""
        loop = asyncio.get_running_loop()
        self._interval_changed = asyncio.Event()
        while True:
            await loop.run_in_executor(None, self.refresh)
            if after is not None:
                after()
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
        why = reader.watch_xids(index)
        if why is not None:
            # Not fatal: the GPU is still sampled (ECC counts still drain it); only XIDs go unseen.
            logger.warning(
                "GPU %d (%s): XID events are not available (%s); XIDs on it will not drain it", index, uuid, why
            )
    inventory = GpuInventory(gpus, backend="nvml", reader=reader)
    inventory.refresh()
    logger.info("NVML GPU backend: %s", ", ".join(f"{g.index}:{g.name}:{g.difficulty}" for g in gpus))
    return inventory
