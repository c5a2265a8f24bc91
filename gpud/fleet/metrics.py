"""Fleet metrics, registered on the daemon's own registry (gpud.metrics.Metrics) only in fleet mode."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class FleetMetrics:
    """Forwarded requests by result, time to the owner's response head, and hosts up in the view."""

    def __init__(self, registry: CollectorRegistry, hosts_up: Callable[[], float]) -> None:
        self.forwarded = Counter(
            "gpud_fleet_forwarded_requests_total",
            "Requests forwarded to another fleet host, by result (ok, unavailable: 503 tried next, error: the host "
            "did not answer)",
            ["result"],
            registry=registry,
        )
        # The label children, looked up once (labels() on every forwarded request is measurable).
        self.forwarded_ok = self.forwarded.labels("ok")
        self.forwarded_unavailable = self.forwarded.labels("unavailable")
        self.forward_duration = Histogram(
            "gpud_fleet_forward_duration_seconds",
            "Time from forwarding a request to the owner's response head",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.hosts_up = Gauge(
            "gpud_fleet_hosts_up", "Hosts registered in etcd, as this host sees them", registry=registry
        )
        self.hosts_up.set_function(hosts_up)
