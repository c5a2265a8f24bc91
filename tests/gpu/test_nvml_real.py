"""The real NVML path (pynvml against the NVIDIA driver). Runs where a GPU is present; skipped elsewhere.

Run on a GPU machine with: pytest tests/gpu -m gpu
"""

from __future__ import annotations

import pytest

from gpud.gpu.inventory import open_inventory
from gpud.gpu.scheduler import Scheduler

pynvml = pytest.importorskip("pynvml")


def nvml_device_count() -> int:
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded: no GPU here
        pytest.skip(f"NVML does not load here: {exc}")
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.gpu
def test_real_nvml_inventory_reads_every_gpu() -> None:
    count = nvml_device_count()
    assert count >= 1
    inventory = open_inventory("nvml", (), {0: "high"})
    try:
        assert inventory.backend == "nvml" and len(inventory.gpus) == count
        first = inventory.gpus[0]
        assert first.real and first.uuid.startswith("GPU-") and first.name and first.difficulty == "high"
        sample = inventory.sample(0)
        assert sample is not None and sample.error is None
        assert sample.memory_total_bytes and sample.memory_total_bytes > 1024**3
        assert sample.memory_used_bytes is not None and 0 <= sample.memory_used_bytes <= sample.memory_total_bytes
        assert sample.utilization_percent is not None and 0 <= sample.utilization_percent <= 100
        assert sample.temperature_c is not None and 0 < sample.temperature_c < 120
        lease = Scheduler(inventory).acquire("high", "t", "task")
        assert lease.gpu.uuid == first.uuid
    finally:
        inventory.close()


@pytest.mark.gpu
def test_auto_backend_picks_nvml_when_it_loads() -> None:
    nvml_device_count()
    inventory = open_inventory("auto", (), {})
    try:
        assert inventory.backend == "nvml"
    finally:
        inventory.close()
