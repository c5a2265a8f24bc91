"""Several real gpud hosts (process runtime, distinct loopback ports) in one fleet, and HTTP helpers for them."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from typing import Any

from tests.daemonproc import DaemonProcess
from tests.fleet.etcdcluster import EtcdCluster
from tests.integration.gpuctl_env import MODEL_ID, GpudHost, start_host
from tests.waiting import wait_for

API_KEY = "test-key"
FLEET_KEY = "fleet-secret-key"
LEASE_TTL = 3


@dataclass(frozen=True)
class SSE:
    """One event of a stream."""

    id: int | None
    event: str
    data: dict[str, Any]


def parse_stream(text: str) -> list[SSE]:
    """Events of a whole SSE body."""
    events = []
    for frame in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in frame.splitlines():
            name, _, value = line.partition(": ")
            if name in ("id", "event", "data"):
                fields[name] = value
        if "data" in fields:
            ident = fields.get("id")
            events.append(SSE(int(ident) if ident else None, fields.get("event", ""), json.loads(fields["data"])))
    return events


def session_body(**metadata: Any) -> dict[str, Any]:
    """A session task on the test model (session_id, when given, goes to the body)."""
    body: dict[str, Any] = {"task_type": "session", "model_id": MODEL_ID, "task_preset": "stream"}
    if "session_id" in metadata:
        body["session_id"] = metadata.pop("session_id")
    body["metadata"] = {"max_tokens": 3, "delay": 0, **metadata}
    return body


@dataclass
class Fleet:
    """Hosts by name; each is a GpudHost (tests/integration/gpuctl_env.py) with fleet settings."""

    etcd: EtcdCluster
    hosts: dict[str, GpudHost] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)

    def env(self, name: str) -> dict[str, str]:
        """A host's fleet settings."""
        return {
            "GPUD_ETCD_ENDPOINTS": self.etcd.endpoints,
            "GPUD_HOST_ID": name,
            "GPUD_FLEET_KEY": FLEET_KEY,
            "GPUD_ETCD_LEASE_TTL_SECONDS": str(LEASE_TTL),
            "GPUD_WORKER_RECONNECT_SECONDS": "0",  # a killed host's workers exit at once
            # A full tier answers 503 rather than ending an idle session (spilling comes before eviction anyway).
            "GPUD_SESSION_EVICT_IDLE": "false",
        }

    def start(self, *names: str, env: dict[str, str] | None = None) -> None:
        """Start hosts (`env` added to their settings) and wait until every one sees all of them."""
        for name in names:
            self.hosts[name] = start_host({**self.env(name), **(env or {})})
        self.wait_hosts(sorted(self.hosts))

    def join(self, name: str, env: dict[str, str] | None = None) -> None:
        """Start one more host (or a killed one again, same id, fresh state) and wait until it sees every live one."""
        if name in self.hosts:
            self.hosts.pop(name).close()
        self.killed.discard(name)
        self.hosts[name] = start_host({**self.env(name), **(env or {})})
        live = sorted(set(self.hosts) - self.killed)
        self.wait_hosts(live, on=[name])

    def daemon(self, name: str) -> DaemonProcess:
        """A host's gpud process."""
        return self.hosts[name].daemon

    def wait_hosts(self, expected: list[str], on: list[str] | None = None, timeout: float = 20.0) -> None:
        """Wait until each host in `on` (default: every running one) lists exactly `expected` in /api/fleet."""
        for name in on or expected:
            wait_for(lambda n=name: self.host_ids(n) == expected, f"{name} to see {expected}", timeout)

    def host_ids(self, name: str) -> list[str]:
        """The hosts `name` sees."""
        status, body = self.get(name, "/api/fleet")
        return [h["host_id"] for h in body["hosts"]] if status == 200 else []

    def get(self, name: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """GET through a host's public API, with the API key."""
        return self.daemon(name).request("GET", path, headers={"X-API-Key": API_KEY, **(headers or {})})

    def submit(self, name: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """POST /api/tasks/submit through a host; (status, events) on 200, else (status, error body)."""
        status, text = self.daemon(name).request(
            "POST", "/api/tasks/submit", body, headers={"X-API-Key": API_KEY, **(headers or {})}
        )
        return (status, parse_stream(text)) if status == 200 else (status, text)

    def kill9(self, name: str) -> None:
        """SIGKILL a host's gpud (its lease then expires)."""
        daemon = self.daemon(name)
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        self.killed.add(name)

    def close(self) -> None:
        """Stop every host."""
        for host in self.hosts.values():
            host.close()


def finish(events: list[SSE]) -> dict[str, Any]:
    """The task_finish data."""
    assert events and events[-1].event == "task_finish", events
    return events[-1].data


def session_of(events: list[SSE]) -> str:
    """The session id the stream's connection event names."""
    return str(next(e.data["session_id"] for e in events if e.event == "connection"))


def task_of(events: list[SSE]) -> str:
    """The task id the stream starts with."""
    return str(events[0].data["task_id"])
