"""What this host knows of the fleet: hosts and their GPUs, and which host owns each session and task.

Built from one listing of `/gpud/` and kept current by the watch's events. Plain data, no I/O: unit-testable.
Keys: `/gpud/hosts/<host>` (a JSON host record), `/gpud/sessions/<id>` and `/gpud/tasks/<id>` (the owner's host
id), all under the owner's lease, so a host's death removes all of them. A removed claim leaves a tombstone (its
last owner): a request for it then goes to that owner while it lives, and is 410 `host_lost` once it is gone.
The durable owner records (`/gpud/~records/...`, gpud/fleet/registration.py) sort after every watched key and
are left out of the listing and the watch: they are read one at a time, for an id this view does not know.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gpud.fleet.etcd import KeyValue, WatchEvent

logger = logging.getLogger(__name__)

PREFIX = "/gpud/"
HOSTS = PREFIX + "hosts/"
KINDS = ("sessions", "tasks")
# Durable owner records: `~records/<kind>/<id>` = owner host id, under the owner's long records lease, and
# `~record-leases/<host>` = that lease's id (so a host restarting with the same id finds and ends the old one).
RECORDS = PREFIX + "~records/"
RECORD_LEASES = PREFIX + "~record-leases/"
# The end of the range the view lists and watches: every key under PREFIX before "~" (no record).
WATCH_END = PREFIX + "~"
# Tombstones kept (oldest dropped first): enough for a day of a busy host's ids, a few MB.
MAX_TOMBSTONES = 100_000


@dataclass(frozen=True)
class GpuState:
    """One GPU of a host, as the host published it."""

    index: int
    tier: str
    leased: bool
    drained: bool
    healthy: bool

    @property
    def free(self) -> bool:
        """Would take a new lease now."""
        return not self.leased and not self.drained and self.healthy

    def to_dict(self) -> dict[str, Any]:
        """The JSON form in the host record."""
        return {
            "index": self.index,
            "tier": self.tier,
            "leased": self.leased,
            "drained": self.drained,
            "healthy": self.healthy,
        }


@dataclass(frozen=True)
class HostRecord:
    """A host's published record."""

    host_id: str
    url: str
    version: str
    gpus: tuple[GpuState, ...]
    updated: float
    sessions: int = 0
    tasks: int = 0

    def free_gpus(self, tier: str) -> int:
        """GPUs of `tier` that would take a lease now."""
        return sum(1 for gpu in self.gpus if gpu.tier == tier and gpu.free)

    def to_json(self) -> bytes:
        """The value stored at /gpud/hosts/<host>."""
        return json.dumps(
            {
                "url": self.url,
                "version": self.version,
                "gpus": [gpu.to_dict() for gpu in self.gpus],
                "updated": self.updated,
                "sessions": self.sessions,
                "tasks": self.tasks,
            }
        ).encode()

    @classmethod
    def parse(cls, host_id: str, raw: bytes) -> HostRecord:
        """A record read from etcd (ValueError/KeyError/TypeError when malformed)."""
        data = json.loads(raw)
        gpus = tuple(
            GpuState(int(g["index"]), str(g["tier"]), bool(g["leased"]), bool(g["drained"]), bool(g["healthy"]))
            for g in data.get("gpus", [])
        )
        return cls(
            host_id=host_id,
            url=str(data["url"]),
            version=str(data.get("version", "?")),
            gpus=gpus,
            updated=float(data.get("updated", 0.0)),
            sessions=int(data.get("sessions", 0)),
            tasks=int(data.get("tasks", 0)),
        )


@dataclass
class FleetView:
    """Hosts, claims and tombstones, as of `revision`."""

    hosts: dict[str, HostRecord] = field(default_factory=dict)
    claims: dict[str, dict[str, str]] = field(default_factory=lambda: {kind: {} for kind in KINDS})
    tombstones: OrderedDict[tuple[str, str], str] = field(default_factory=OrderedDict)
    revision: int = 0
    # Monotonic time of the last listing or event (how fresh the view is).
    synced_at: float | None = None

    def load(self, kvs: Iterable[KeyValue], revision: int) -> None:
        """Replace hosts and claims with a fresh listing; claims that vanished meanwhile become tombstones."""
        old = {kind: dict(owners) for kind, owners in self.claims.items()}
        self.hosts = {}
        self.claims = {kind: {} for kind in KINDS}
        for kv in kvs:
            self._put(kv)
        for kind, owners in old.items():
            for item, host in owners.items():
                if item not in self.claims[kind]:
                    self._bury(kind, item, host)
        self.revision = revision
        self.synced_at = time.monotonic()

    def apply(self, event: WatchEvent) -> None:
        """One watch event."""
        if event.kind == "put":
            self._put(event.kv)
        else:
            self._delete(event.kv.key, event.prev)
        self.revision = max(self.revision, event.kv.mod_revision)
        self.synced_at = time.monotonic()

    def _put(self, kv: KeyValue) -> None:
        parsed = _split(kv.key)
        if parsed is None:
            return
        kind, name = parsed
        if kind == "hosts":
            try:
                self.hosts[name] = HostRecord.parse(name, kv.value)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring a malformed fleet host record %s: %s", name, exc)
            return
        self.claims[kind][name] = kv.value.decode(errors="replace")
        self.tombstones.pop((kind, name), None)

    def _delete(self, key: str, prev: KeyValue | None) -> None:
        parsed = _split(key)
        if parsed is None:
            return
        kind, name = parsed
        if kind == "hosts":
            self.hosts.pop(name, None)
            return
        host = self.claims[kind].pop(name, None)
        if host is None and prev is not None:
            host = prev.value.decode(errors="replace")
        if host is not None:
            self._bury(kind, name, host)

    def _bury(self, kind: str, name: str, host: str) -> None:
        self.tombstones[(kind, name)] = host
        self.tombstones.move_to_end((kind, name))
        while len(self.tombstones) > MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)

    def owner(self, kind: str, name: str) -> tuple[str | None, bool]:
        """(the host that owns or last owned a session/task, whether its claim is live); (None, False) if unknown."""
        host = self.claims[kind].get(name)
        if host is not None:
            return host, True
        return self.tombstones.get((kind, name)), False

    def hosts_with_free(self, tier: str, exclude: str) -> list[HostRecord]:
        """Other hosts with a free GPU of `tier`, the most free first (ties by name)."""
        found = [h for h in self.hosts.values() if h.host_id != exclude and h.free_gpus(tier) > 0]
        return sorted(found, key=lambda h: (-h.free_gpus(tier), h.host_id))

    def sessions_by_host(self) -> dict[str, int]:
        """How many session claims each host holds."""
        counts: dict[str, int] = {}
        for host in self.claims["sessions"].values():
            counts[host] = counts.get(host, 0) + 1
        return counts


def _split(key: str) -> tuple[str, str] | None:
    """('hosts'|'sessions'|'tasks', name) of a fleet key, or None for anything else."""
    if not key.startswith(PREFIX):
        return None
    kind, _, name = key[len(PREFIX) :].partition("/")
    if kind not in ("hosts", *KINDS) or not name or "/" in name:
        return None
    return kind, name
