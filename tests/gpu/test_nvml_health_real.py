"""GPU health on the real NVML path: XID event registration and polling, volatile ECC counts and clock event
(throttle) reasons read from a real GPU must not raise, and agree with what pynvml answers directly. Skipped
where NVML does not load.

Run on a GPU machine with: pytest tests/gpu -m gpu
"""

from __future__ import annotations

import time

import pytest

from gpud.daemon.gpu_metrics import GpuCollector
from gpud.gpu.health import GpuHealth
from gpud.gpu.inventory import open_inventory
from gpud.gpu.nvml import THROTTLE_REASONS, NvmlReader
from gpud.gpu.scheduler import Scheduler
from gpud.metrics import Metrics
from tests.gpu.test_nvml_real import nvml_device_count

pynvml = pytest.importorskip("pynvml")


@pytest.mark.gpu
def test_real_xid_event_set_registers_and_polls_without_blocking() -> None:
    count = nvml_device_count()
    reader = NvmlReader(pynvml)
    assert reader.open() == count
    try:
        for index in range(count):
            why = reader.watch_xids(index)
            # Registration may be refused (Not Supported in some VMs, or without permission), never raised.
            assert why is None or isinstance(why, str), why
            started = time.monotonic()
            xids = reader.xids(index)
            assert isinstance(xids, list) and all(isinstance(x, int) for x in xids)
            assert time.monotonic() - started < 1.0, "polling the event set must not wait"
    finally:
        reader.close()


@pytest.mark.gpu
def test_real_ecc_throttle_and_power_readings() -> None:
    nvml_device_count()
    inventory = open_inventory("nvml", (), {})
    try:
        for gpu in inventory.gpus:
            sample = inventory.sample(gpu.index)
            assert sample is not None and sample.error is None, sample
            for count in (sample.ecc_corrected, sample.ecc_uncorrected):
                assert count is None or count >= 0  # None: no ECC on this board (Not Supported)
            assert sample.throttle_reasons is None or set(sample.throttle_reasons) <= set(THROTTLE_REASONS)
            assert sample.power_watts is None or 0 < sample.power_watts < 2000
            # The same counters straight from pynvml, where the board has them.
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
            if sample.ecc_uncorrected is not None:
                direct = pynvml.nvmlDeviceGetTotalEccErrors(
                    handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
                )
                assert direct >= sample.ecc_uncorrected  # counts only grow between the two reads
        scheduler = Scheduler(inventory)
        health = GpuHealth(inventory, scheduler)
        inventory.refresh()
        health.check()
        for gpu in inventory.gpus:
            sample = inventory.sample(gpu.index)
            assert sample is not None
            if not sample.ecc_uncorrected:
                assert scheduler.is_healthy(gpu.index), scheduler.drain_reason(gpu.index)
        metrics = Metrics()
        metrics.watch(GpuCollector(inventory, scheduler, health))
        text = metrics.render().decode()
        assert "gpud_gpu_utilization_ratio{" in text and "gpud_gpu_healthy{" in text
        if inventory.sample(0).throttle_reasons is not None:  # type: ignore[union-attr]
            assert all(f'reason="{reason}"' in text for reason in THROTTLE_REASONS)
    finally:
        inventory.close()
