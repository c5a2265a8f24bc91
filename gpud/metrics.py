"""The daemon's one Prometheus registry and the metrics it owns (no prometheus_client global registry).

Conventions: base units (seconds, bytes, ratios 0-1), `_total` on counters, bounded labels only (a model, a tier,
a status; never an id). Every labelled counter and histogram has its known label sets made at start (0), so
`increase()` and ratios work from the first scrape; `_created` series are left out unless asked for.
"""

from __future__ import annotations

import copy
import platform
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gpud import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST

_M = TypeVar("_M", Counter, Gauge, Histogram)
# Each labelled metric's children by label values, looked up before prometheus_client's own labels(), which checks
# and converts its arguments and takes a lock on every call: several times per task, on the warm path.
_CHILDREN: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], Any]] = weakref.WeakKeyDictionary()


def child(metric: _M, *values: str) -> _M:
    """metric.labels(*values), remembered (label values are bounded, so the memo is too)."""
    children = _CHILDREN.get(metric)
    if children is None:
        children = _CHILDREN[metric] = {}
    found = children.get(values)
    if found is None:
        found = children[values] = metric.labels(*values)
    return found


# The known values of the bounded labels (as gpud.work and gpud.gpu spell them; this room cannot import them).
TASK_TYPES = ("session", "oneoff")
FINAL_STATUSES = ("completed", "failed", "timeout", "cancelled")
TIERS = ("low", "high")
APPS = ("public", "admin")
# Statuses a refused submission gets (made at start; another status is counted under its own code).
REFUSAL_STATUSES = ("400", "401", "403", "404", "409", "410", "413", "429", "503")
# Seconds buckets for waits and starts: a warm session answers in milliseconds, a model load takes minutes.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
_WITH_CREATED = frozenset({"counter", "histogram", "summary"})


class Metrics:
    """Every metric gpud exports, registered on a private registry owned by one daemon.

    `created_series`: also export the `_created` series of counters and histograms (GPUD_METRICS_CREATED_SERIES)."""

    def __init__(self, created_series: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.created_series = created_series
        ProcessCollector(registry=self.registry)  # process_start_time_seconds, _resident_memory_bytes, fds, CPU
        r = self.registry
        build = Gauge("gpud_build_info", "gpud's version and Python's (always 1)", ["version", "python"], registry=r)
        build.labels(__version__, platform.python_version()).set(1)
        self._http(r)
        self._tasks(r)
        self._sessions(r)
        self._models(r)
        self._engine(r)
        self.reloads = Counter("gpud_reloads_total", "Configuration reloads by result", ["result"], registry=r)
        _touch(self.reloads, [("ok",), ("failed",)])
        self._without_created = CollectorRegistry(auto_describe=False)
        self._without_created.register(_WithoutCreated(self.registry))

    def _http(self, r: CollectorRegistry) -> None:
        self.http_requests = Counter(
            "gpud_http_requests_total", "HTTP requests by app, route and status", ["app", "route", "status"],
            registry=r,
        )  # fmt: skip
        self.http_latency = Histogram(
            "gpud_http_request_duration_seconds", "HTTP request handling time until the response starts",
            ["app", "route"], registry=r,
        )  # fmt: skip
        self.http_connections_open = Gauge(
            "gpud_http_connections_open", "Open HTTP connections by app (capped per app)", ["app"], registry=r
        )
        self.http_connections_refused = Counter(
            "gpud_http_connections_refused_total", "Connections refused with 503 because the app's cap was reached",
            ["app"], registry=r,
        )  # fmt: skip
        self.http_connections_timed_out = Counter(
            "gpud_http_connections_timed_out_total",
            "Connections closed for sending no request head in time (header) or idling between requests (idle)",
            ["app", "reason"], registry=r,
        )  # fmt: skip
        self.sse_clients = Gauge("gpud_sse_clients", "Connected SSE streams of task events", registry=r)
        self.submissions_refused = Counter(
            "gpud_task_submissions_refused_total", "Task submissions answered with an error, by HTTP status",
            ["status"], registry=r,
        )  # fmt: skip
        _touch(self.http_connections_open, [(app,) for app in APPS])
        _touch(self.http_connections_refused, [(app,) for app in APPS])
        _touch(self.http_connections_timed_out, [(app, why) for app in APPS for why in ("header", "idle")])
        _touch(self.submissions_refused, [(status,) for status in REFUSAL_STATUSES])

    def _tasks(self, r: CollectorRegistry) -> None:
        self.tasks_finished = Counter(
            "gpud_tasks_finished_total", "Tasks that ended, by type and final status", ["type", "status"], registry=r
        )
        self.task_duration = Histogram(
            "gpud_task_duration_seconds", "Time from submission to task_finish, by type and final status",
            ["type", "status"], buckets=TASK_BUCKETS, registry=r,
        )  # fmt: skip
        self.task_queue_wait = Histogram(
            "gpud_task_queue_wait_seconds",
            "Time from submission until the task runs (a one-off's model fetch and container start included)",
            ["type"], buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.task_first_output = Histogram(
            "gpud_task_first_output_seconds", "Time from submission to the task's first output (text or text_delta)",
            ["type"], buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.client_gone_cancels = Counter(
            "gpud_tasks_client_gone_cancelled_total",
            "Tasks cancelled because every client left and none came back within the grace period", registry=r,
        )  # fmt: skip
        self.worker_crashes = Counter(
            "gpud_worker_crashes_total",
            "Workers that died unexpectedly: a session worker that exited or dropped its connection, a one-off"
            " killed for memory or by a signal", ["type"], registry=r,
        )  # fmt: skip
        outcomes = [(kind, status) for kind in TASK_TYPES for status in FINAL_STATUSES]
        _touch(self.tasks_finished, outcomes)
        _touch(self.task_duration, outcomes)
        for family in (self.task_queue_wait, self.task_first_output, self.worker_crashes):
            _touch(family, [(kind,) for kind in TASK_TYPES])

    def _sessions(self, r: CollectorRegistry) -> None:
        self.session_start = Histogram(
            "gpud_session_start_seconds",
            "Time from a session worker's start until it is ready (model fetch, image, container, model load)",
            ["model"], buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.worker_ready = Histogram(
            "gpud_worker_ready_seconds", "Time from a session worker's container creation until ready (the model load)",
            ["model"], buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.session_restarts = Counter(
            "gpud_session_restarts_total", "Session workers replaced because a task would not stop", registry=r
        )
        self.sessions_evicted = Counter(
            "gpud_sessions_evicted_total", "Idle sessions ended to give their GPU to new work", registry=r
        )
        self.gpu_seconds = Counter(
            "gpud_gpu_seconds_total", "GPU lease time used by tasks and sessions (added when a lease ends)",
            ["model", "tier"], registry=r,
        )  # fmt: skip

    def _models(self, r: CollectorRegistry) -> None:
        self.model_fetch_bytes = Counter(
            "gpud_model_fetch_bytes_total", "Bytes of models downloaded from the file service", registry=r
        )
        self.model_fetch_duration = Histogram(
            "gpud_model_fetch_duration_seconds", "Time a model fetch took (download, unpack, publish), when it worked",
            buckets=(*WAIT_BUCKETS, 7200, 21600), registry=r,
        )  # fmt: skip
        self.model_fetch_failures = Counter("gpud_model_fetch_failures_total", "Model fetches that failed", registry=r)
        self.model_cache_evictions = Counter(
            "gpud_model_cache_evictions_total", "Models removed from the cache to make room", registry=r
        )

    def _engine(self, r: CollectorRegistry) -> None:
        self.engine_up = Gauge("gpud_engine_up", "1 while the container engine answers, else 0", registry=r)
        self.engine_errors = Counter(
            "gpud_engine_errors_total", "Engine calls that failed (engine unreachable or answering with an error)",
            registry=r,
        )  # fmt: skip
        self.image_pulls = Counter("gpud_image_pulls_total", "Image pulls by result", ["result"], registry=r)
        _touch(self.image_pulls, [("ok",), ("failed",)])

    def know_models(self, models: Iterable[str]) -> None:
        """Make the per-model series of these models (the presets') now, at 0."""
        for model in models:
            self.session_start.labels(model)
            self.worker_ready.labels(model)
            for tier in TIERS:
                self.gpu_seconds.labels(model, tier)

    def gpu_used(self, model: str, tier: str, seconds: float) -> None:
        """Add the time a GPU lease of `model` on a `tier` GPU lasted, as it ends."""
        self.gpu_seconds.labels(model, tier).inc(max(0.0, seconds))

    def image_pulled(self, ok: bool) -> None:
        """Count one image pull (an engine's single-flight pull, however many waited for it)."""
        self.image_pulls.labels("ok" if ok else "failed").inc()

    def watch(self, collector: Collector) -> None:
        """Export what a collector reads from live state at each scrape (gauges derived from the same objects
        the API reports: nothing to keep in sync)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        """The exposition text for /metrics."""
        return generate_latest(self.registry if self.created_series else self._without_created)


def _touch(family: Counter | Gauge | Histogram, label_sets: Iterable[tuple[str, ...]]) -> None:
    """Make each child series now, so it is exported as 0 before anything happens."""
    for labels in label_sets:
        family.labels(*labels)


class _WithoutCreated(Collector):
    """A registry's families without their `_created` samples (prometheus_client's own switch for that is
    process-wide; this is per daemon)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def describe(self) -> list[Metric]:
        """Nothing to check for clashes: the families are the registry's own."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The registry's families, `_created` samples removed."""
        for family in self._registry.collect():
            if family.type in _WITH_CREATED:
                family = copy.copy(family)
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
