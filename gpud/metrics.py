"""The daemon's one Prometheus registry and the metrics it owns (no prometheus_client global registry)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gpud import __version__

if TYPE_CHECKING:
    from gpud.gpus import GpuInventory
    from gpud.scheduler import Scheduler
    from gpud.sessions import SessionRegistry
    from gpud.tasks import TaskRegistry

CONTENT_TYPE = CONTENT_TYPE_LATEST


class StateSource(Protocol):
    """What the state collector reads (the daemon's Services satisfies it)."""

    @property
    def inventory(self) -> GpuInventory: ...

    @property
    def scheduler(self) -> Scheduler: ...

    def task_registry(self) -> TaskRegistry: ...

    def session_registry(self) -> SessionRegistry: ...


class Metrics:
    """Every metric gpud exports, registered on a private registry owned by one daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.info = Gauge("gpud_info", "gpud version", ["version"], registry=self.registry)
        self.info.labels(version=__version__).set(1)
        self.http_requests = Counter(
            "gpud_http_requests_total",
            "HTTP requests by app, route and status",
            ["app", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "gpud_http_request_duration_seconds",
            "HTTP request handling time until the response starts",
            ["app", "route"],
            registry=self.registry,
        )
        self.tasks_finished = Counter(
            "gpud_tasks_finished_total", "Tasks that ended, by type and final status", ["type", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.task_duration = Histogram(
            "gpud_task_duration_seconds",
            "Time from submission to task_finish, by type and final status",
            ["type", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
            registry=self.registry,
        )
        self.reloads = Counter(
            "gpud_reloads_total", "Configuration reloads by result", ["result"], registry=self.registry
        )

    def watch(self, state: StateSource) -> None:
        """Export gauges read from live state at each scrape (GPUs, leases, sessions, tasks): nothing to keep
        in sync, the numbers are derived from the same objects the API reports."""
        self.registry.register(StateCollector(state))

    def render(self) -> bytes:
        """The exposition text for /metrics."""
        return generate_latest(self.registry)


class StateCollector:
    """Gauges computed at scrape time from the daemon's live objects."""

    def __init__(self, state: StateSource) -> None:
        self._state = state

    def describe(self) -> list[Metric]:
        """No fixed description: the families are produced per scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        """GPU lease/drain and NVML samples, sessions by state, tasks by status, queued tasks."""
        yield from self._gpus()
        sessions = GaugeMetricFamily("gpud_sessions", "Known sessions by state", labels=["state"])
        for state, count in sorted(Tally(s.state.value for s in self._state.session_registry().all()).items()):
            sessions.add_metric([state], count)
        yield sessions
        tasks = GaugeMetricFamily("gpud_tasks", "Known tasks (active and retained) by status", labels=["status"])
        for status, count in sorted(Tally(t.status.value for t in self._state.task_registry().all()).items()):
            tasks.add_metric([status], count)
        yield tasks
        queued = sum(len(s.queue) for s in self._state.session_registry().live())
        yield GaugeMetricFamily("gpud_session_queued_tasks", "Tasks waiting in session queues", value=queued)

    def _gpus(self) -> Iterator[Metric]:
        labels = ["gpu", "uuid", "difficulty"]
        leased = GaugeMetricFamily("gpud_gpu_leased", "1 when the GPU is leased", labels=labels)
        drained = GaugeMetricFamily("gpud_gpu_drained", "1 when the GPU takes no new leases", labels=labels)
        memory = GaugeMetricFamily("gpud_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=labels)
        total = GaugeMetricFamily("gpud_gpu_memory_total_bytes", "GPU memory (NVML)", labels=labels)
        util = GaugeMetricFamily("gpud_gpu_utilization_percent", "GPU utilisation (NVML)", labels=labels)
        temp = GaugeMetricFamily("gpud_gpu_temperature_celsius", "GPU temperature (NVML)", labels=labels)
        scheduler = self._state.scheduler
        for gpu in self._state.inventory.gpus:
            values = [str(gpu.index), gpu.uuid, gpu.difficulty]
            leased.add_metric(values, 1 if scheduler.lease_of(gpu.index) else 0)
            drained.add_metric(values, 1 if scheduler.is_drained(gpu.index) else 0)
            sample = self._state.inventory.sample(gpu.index)
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
