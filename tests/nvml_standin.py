"""A stand-in for the pynvml module: the one fake this project allows (CI machines have no NVIDIA GPU).

The same gpud code runs against the real pynvml in tests/gpu/test_nvml_real.py on a lent GPU machine.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    """Like pynvml.NVMLError."""


class FakeNvml:
    """Implements the handful of pynvml calls gpud makes, for N GPUs."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, count: int = 2, fail_init: bool = False) -> None:
        self.count = count
        self.fail_init = fail_init
        self.broken: set[int] = set()
        self.shutdowns = 0
        self.memory_reads = 0  # one per GPU per sample: shows how often gpud samples

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.broken:
            raise NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-0000-{handle}".encode()  # older pynvml returns bytes

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        self.memory_reads += 1
        return SimpleNamespace(total=80 * 1024**3, used=(handle + 1) * 1024**3, free=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=40 + handle, memory=10)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 55

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle == 1:
            raise NVMLError("Not Supported")
        return 250_000  # milliwatts
