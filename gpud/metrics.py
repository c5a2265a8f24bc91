"""The daemon's one Prometheus registry and the metrics it owns (no prometheus_client global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
        self.gpu_leased = Gauge(
            "gpud_gpu_leased", "1 when a GPU is leased", ["gpu", "difficulty"], registry=self.registry
        )
        self.gpu_memory_used = Gauge(
            "gpud_gpu_memory_used_bytes", "GPU memory in use (NVML)", ["gpu"], registry=self.registry
        )
        self.gpu_utilization = Gauge(
            "gpud_gpu_utilization_percent", "GPU utilisation (NVML)", ["gpu"], registry=self.registry
        )
        self.reloads = Counter(
            "gpud_reloads_total", "Configuration reloads by result", ["result"], registry=self.registry
        )

    def render(self) -> bytes:
        """The exposition text for /metrics."""
        return generate_latest(self.registry)
