"""Gauges computed at scrape time from the daemon's live objects: GPUs, leases, sessions, tasks."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from gpud.gpu.inventory import GpuInventory
from gpud.gpu.scheduler import Scheduler
from gpud.work.sessions.record import SessionRegistry
from gpud.work.task import TaskRegistry


class StateCollector:
    """Gauges computed at scrape time from the daemon's live objects."""

    def __init__(
        self, inventory: GpuInventory, scheduler: Scheduler, tasks: TaskRegistry, sessions: SessionRegistry
    ) -> None:
        self._inventory = inventory
        self._scheduler = scheduler
        self._tasks = tasks
        self._sessions = sessions

    def describe(self) -> list[Metric]:
        """No fixed description: the families are produced per scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        """GPU lease/drain and NVML samples, sessions by state, tasks by status, queued tasks."""
        yield from self._gpus()
        sessions = GaugeMetricFamily("gpud_sessions", "Known sessions by state", labels=["state"])
        for state, count in sorted(Tally(s.state.value for s in self._sessions.all()).items()):
            sessions.add_metric([state], count)
        yield sessions
        tasks = GaugeMetricFamily("gpud_tasks", "Known tasks (active and retained) by status", labels=["status"])
        for status, count in sorted(Tally(t.status.value for t in self._tasks.all()).items()):
            tasks.add_metric([status], count)
        yield tasks
        queued = sum(len(s.queue) for s in self._sessions.live())
        yield GaugeMetricFamily("gpud_session_queued_tasks", "Tasks waiting in session queues", value=queued)

    def _gpus(self) -> Iterator[Metric]:
        labels = ["gpu", "uuid", "difficulty"]
        leased = GaugeMetricFamily("gpud_gpu_leased", "1 when the GPU is leased", labels=labels)
        drained = GaugeMetricFamily("gpud_gpu_drained", "1 when the GPU takes no new leases", labels=labels)
        memory = GaugeMetricFamily("gpud_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=labels)
        total = GaugeMetricFamily("gpud_gpu_memory_total_bytes", "GPU memory (NVML)", labels=labels)
        util = GaugeMetricFamily("gpud_gpu_utilization_percent", "GPU utilisation (NVML)", labels=labels)
        temp = GaugeMetricFamily("gpud_gpu_temperature_celsius", "GPU temperature (NVML)", labels=labels)
        scheduler = self._scheduler
        for gpu in self._inventory.gpus:
            values = [str(gpu.index), gpu.uuid, gpu.difficulty]
            leased.add_metric(values, 1 if scheduler.lease_of(gpu.index) else 0)
            drained.add_metric(values, 1 if scheduler.is_drained(gpu.index) else 0)
            sample = self._inventory.sample(gpu.index)
            if sample is None or sample.error:
                continue
            for family, value in (
                (memory, sample.memory_used_bytes),
                (total, sample.memory_total_bytes),
                (util, sample.utilization_percent),
                (temp, sample.temperature_c),
            ):
                if value is not None:
                    family.add_metric(values, value)
        yield from (leased, drained, memory, total, util, temp)
