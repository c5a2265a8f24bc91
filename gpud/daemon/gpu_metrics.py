"""Every per-GPU metric, read at scrape time from the inventory, the scheduler and the health policy."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpud.gpu.health import GpuHealth
from gpud.gpu.inventory import GpuInventory
from gpud.gpu.nvml import THROTTLE_REASONS
from gpud.gpu.scheduler import Scheduler

LABELS = ["gpu", "uuid", "difficulty"]


class GpuCollector:
    """GPU lease, drain and health state, NVML samples, XID and ECC errors, throttling, and auto-drains."""

    def __init__(self, inventory: GpuInventory, scheduler: Scheduler, health: GpuHealth) -> None:
        self._inventory = inventory
        self._scheduler = scheduler
        self._health = health

    def describe(self) -> list[Metric]:
        """No fixed description: the families are produced per scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One sample per GPU (and per ECC type / throttle reason) in each family; samples NVML could not read
        are left out rather than reported as 0."""
        gauge = GaugeMetricFamily
        leased = gauge("gpud_gpu_leased", "1 when the GPU is leased", labels=LABELS)
        drained = gauge("gpud_gpu_drained", "1 when the GPU takes no new leases", labels=LABELS)
        healthy = gauge(
            "gpud_gpu_healthy", "0 from an auto-drain (fatal XID, uncorrectable ECC) or a failed NVML read until "
            "fixed; 1 otherwise", labels=LABELS,
        )  # fmt: skip
        xids = CounterMetricFamily("gpud_gpu_xid_errors", "XID events NVML reported since start", labels=LABELS)
        used = gauge("gpud_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=LABELS)
        total = gauge("gpud_gpu_memory_total_bytes", "GPU memory (NVML)", labels=LABELS)
        util = gauge("gpud_gpu_utilization_ratio", "GPU busy time over NVML's last sample period, 0-1", labels=LABELS)
        temp = gauge("gpud_gpu_temperature_celsius", "GPU temperature (NVML)", labels=LABELS)
        power = gauge("gpud_gpu_power_watts", "GPU power draw (NVML)", labels=LABELS)
        ecc = gauge(
            "gpud_gpu_ecc_errors", "Volatile ECC errors by type since the driver loaded or the GPU was reset (NVML)",
            labels=[*LABELS, "type"],
        )  # fmt: skip
        throttled = gauge(
            "gpud_gpu_throttled", "1 while NVML reports this clock slowdown reason", labels=[*LABELS, "reason"]
        )
        scheduler = self._scheduler
        for gpu in self._inventory.gpus:
            values = [str(gpu.index), gpu.uuid, gpu.difficulty]
            sample = self._inventory.sample(gpu.index)
            read = sample if sample is not None and not sample.error else None
            leased.add_metric(values, 1 if scheduler.lease_of(gpu.index) else 0)
            drained.add_metric(values, 1 if scheduler.is_drained(gpu.index) else 0)
            ok = scheduler.is_healthy(gpu.index) and (sample is None or not sample.error)
            healthy.add_metric(values, 1 if ok else 0)
            xids.add_metric(values, self._inventory.xid_count(gpu.index))
            if read is None:
                continue
            ratio = None if read.utilization_percent is None else read.utilization_percent / 100
            for family, value in (
                (used, read.memory_used_bytes),
                (total, read.memory_total_bytes),
                (util, ratio),
                (temp, read.temperature_c),
                (power, read.power_watts),
            ):
                if value is not None:
                    family.add_metric(values, value)
            for kind, count in (("corrected", read.ecc_corrected), ("uncorrected", read.ecc_uncorrected)):
                if count is not None:
                    ecc.add_metric([*values, kind], count)
            if read.throttle_reasons is not None:
                for reason in THROTTLE_REASONS:
                    throttled.add_metric([*values, reason], 1 if reason in read.throttle_reasons else 0)
        drains = CounterMetricFamily(
            "gpud_gpu_auto_drains", "GPUs drained as unhealthy, by kind of fault (xid, ecc)", labels=["reason"]
        )
        for kind, count in self._health.auto_drains.items():
            drains.add_metric([kind], count)
        yield from (leased, drained, healthy, xids, used, total, util, temp, power, ecc, throttled, drains)
