"""The daemon's one Prometheus registry and the metrics it owns (no prometheus_client global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gpud import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST


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
        self.http_connections_open = Gauge(
            "gpud_http_connections_open", "Open HTTP connections by app (capped per app)", ["app"],
            registry=self.registry,
        )  # fmt: skip
        self.http_connections_refused = Counter(
            "gpud_http_connections_refused_total", "Connections refused with 503 because the app's cap was reached",
            ["app"], registry=self.registry,
        )  # fmt: skip
        self.http_connections_timed_out = Counter(
            "gpud_http_connections_timed_out_total",
            "Connections closed for sending no request head in time (header) or idling between requests (idle)",
            ["app", "reason"], registry=self.registry,
        )  # fmt: skip
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

    def watch(self, collector: Collector) -> None:
        """Export what a collector reads from live state at each scrape (gauges derived from the same objects
        the API reports: nothing to keep in sync)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        """The exposition text for /metrics."""
        return generate_latest(self.registry)
