"""The Fleet service: registration, the watched view, where a session or task lives, where new work may go.

Built by the composition root only when GPUD_ETCD_ENDPOINTS is set; the API's fleet middleware asks it where a
request belongs (gpud/api/fleet.py) and forwards with its HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from gpud import __version__
from gpud.errors import ConfigError
from gpud.fleet.etcd import EtcdClient, EtcdError, EtcdOptions, EtcdUnavailable, sleep_or_stop
from gpud.fleet.metrics import FleetMetrics
from gpud.fleet.registration import RETRY_INTERVAL, LocalState, Registrar
from gpud.fleet.view import PREFIX, FleetView, GpuState, HostRecord
from gpud.gpu.inventory import GpuInventory
from gpud.gpu.scheduler import Scheduler
from gpud.metrics import Metrics
from gpud.settings import Settings
from gpud.work.service import TaskService

logger = logging.getLogger(__name__)

_HOST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# How long a request for an id nobody claims waits for the claim to arrive (its owner publishes within ~50 ms of
# creating it; a client may use the id on another host sooner than that).
CLAIM_WAIT_SECONDS = 0.5


@dataclass(frozen=True)
class Route:
    """Where a request for a session or task goes: `local`, `remote` (to `url`), `lost` (its host is gone)."""

    where: str
    host: str | None = None
    url: str | None = None


LOCAL = Route("local")


@dataclass(frozen=True)
class FleetConfig:
    """Fleet mode's settings, checked."""

    host_id: str
    url: str
    key: str
    ttl: int
    etcd: EtcdOptions

    @classmethod
    def from_settings(cls, settings: Settings) -> FleetConfig:
        """Check the fleet settings; ConfigError naming each problem."""
        problems = []
        host_id = settings.host_id or socket.gethostname().split(".")[0]
        if not _HOST_ID_RE.match(host_id):
            problems.append(f"host_id: {host_id!r} must match {_HOST_ID_RE.pattern}")
        if not settings.fleet_key:
            problems.append("fleet_key: required in fleet mode (GPUD_FLEET_KEY or GPUD_FLEET_KEY_FILE)")
        if settings.etcd_cert_file and not settings.etcd_key_file:
            problems.append("etcd_key_file: required with etcd_cert_file")
        if problems:
            raise ConfigError(problems)
        host, port = settings.http_listen
        url = settings.advertise_url or f"http://{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{port}"
        options = EtcdOptions(
            endpoints=settings.etcd_endpoints,
            ca_file=settings.etcd_ca_file,
            cert_file=settings.etcd_cert_file,
            key_file=settings.etcd_key_file,
            username=settings.etcd_username,
            password=settings.etcd_password,
        )
        return cls(host_id, url, settings.fleet_key or "", settings.etcd_lease_ttl_seconds, options)


class Fleet:
    """This host's membership of the fleet and its view of the others."""

    def __init__(
        self,
        config: FleetConfig,
        inventory: GpuInventory,
        scheduler: Scheduler,
        tasks: TaskService,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.host_id = config.host_id
        self._inventory = inventory
        self._scheduler = scheduler
        self._tasks = tasks
        self.client = EtcdClient(config.etcd)
        self.view = FleetView()
        self.registrar = Registrar(self.client, config.host_id, config.url, __version__, config.ttl, self.local_state)
        self.metrics = FleetMetrics(metrics.registry, lambda: float(len(self.view.hosts)))
        self.watch_error: str | None = "not listed yet"
        self._http: aiohttp.ClientSession | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    def local_state(self) -> LocalState:
        """GPU states and the ids this host answers for, now."""
        unhealthy = self._inventory.unhealthy()
        gpus = tuple(
            GpuState(
                index=gpu.index,
                tier=gpu.difficulty,
                leased=self._scheduler.lease_of(gpu.index) is not None,
                drained=self._scheduler.is_drained(gpu.index),
                healthy=gpu.index not in unhealthy,
            )
            for gpu in self._inventory.gpus
        )
        # Every session and task still in memory (ended ones too, for a while): another host then forwards a
        # request for one to this host, which answers as it would itself (410 ended, the task's result, ...).
        sessions = self._tasks.sessions.registry.all()
        tasks = self._tasks.registry.all()
        return LocalState(
            gpus=gpus,
            sessions=frozenset(s.id for s in sessions),
            tasks=frozenset(t.id for t in tasks),
            live_sessions=sum(1 for s in sessions if not s.is_over),
            active_tasks=sum(1 for t in tasks if not t.final),
        )

    async def start(self) -> None:
        """Start registering and watching; returns at once (etcd may be down: this host serves anyway)."""
        self._loops = [
            asyncio.create_task(self.registrar.run(), name="fleet-registrar"),
            asyncio.create_task(self._watch_forever(), name="fleet-watch"),
        ]

    async def close(self) -> None:
        """Leave the fleet (revoke the lease) and stop."""
        self._stop.set()
        await self.registrar.stop()
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.client.close()
        if self._http is not None:
            await self._http.close()

    async def _watch_forever(self) -> None:
        """List /gpud/, then follow the watch from that revision; after an error list again (a fresh view)."""
        while not self._stop.is_set():
            try:
                kvs, revision = await self.client.get_prefix(PREFIX)
                self.view.load(kvs, revision)
                self.watch_error = None
                async for event in self.client.watch(PREFIX, revision + 1):
                    self.view.apply(event)
            except (EtcdUnavailable, EtcdError) as exc:
                if self.watch_error is None:
                    logger.warning("fleet: watch of %s failed (listing again): %s", PREFIX, exc)
                self.watch_error = str(exc)
            if await sleep_or_stop(self._stop, RETRY_INTERVAL if self.watch_error else 0.0):
                return

    def degraded(self) -> str | None:
        """Why this host is not a full fleet member now (etcd unreachable), or None."""
        problem = self.registrar.error or self.watch_error
        return f"etcd_unreachable: {problem}" if problem else None

    @property
    def http(self) -> aiohttp.ClientSession:
        """The HTTP client for requests forwarded to other hosts (kept-alive connections)."""
        if self._http is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
            self._http = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._http

    def route(self, kind: str, item: str) -> Route:
        """Where a request for session/task `item` (not found here) goes, from the view."""
        host, _live = self.view.owner(kind, item)
        if host is None or host == self.host_id:
            return LOCAL
        record = self.view.hosts.get(host)
        if record is not None:
            return Route("remote", host, record.url)
        # The host's record is gone: its lease expired (a claim still seen is about to go the same way).
        return Route("lost", host)

    async def locate(self, kind: str, item: str) -> Route:
        """route(), waiting briefly for a claim this host has not seen yet (a just-created session)."""
        found = self.route(kind, item)
        if found is not LOCAL or self.degraded() is not None:
            return found
        deadline = time.monotonic() + CLAIM_WAIT_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            found = self.route(kind, item)
            if found is not LOCAL:
                return found
        return LOCAL

    def spill_targets(self, tier: str) -> list[HostRecord]:
        """Other hosts with a free, healthy, undrained GPU of `tier`, best first."""
        return self.view.hosts_with_free(tier, exclude=self.host_id)

    def report(self) -> dict[str, Any]:
        """GET /api/fleet: this host, etcd, and every host with its GPUs per tier and sessions."""
        sessions = self.view.sessions_by_host()
        hosts = []
        for record in sorted(self.view.hosts.values(), key=lambda h: h.host_id):
            tiers: dict[str, dict[str, int]] = {}
            for gpu in record.gpus:
                counts = tiers.setdefault(gpu.tier, {"total": 0, "free": 0, "leased": 0, "drained": 0, "unhealthy": 0})
                counts["total"] += 1
                counts["free"] += gpu.free
                counts["leased"] += gpu.leased
                counts["drained"] += gpu.drained
                counts["unhealthy"] += not gpu.healthy
            healthy = all(gpu.healthy for gpu in record.gpus)
            hosts.append(
                {
                    "host_id": record.host_id,
                    "url": record.url,
                    "version": record.version,
                    "self": record.host_id == self.host_id,
                    "health": "ok" if healthy else "degraded",
                    "gpus": tiers,
                    "sessions": sessions.get(record.host_id, 0),
                    "live_sessions": record.sessions,
                    "active_tasks": record.tasks,
                    "last_seen": record.updated,
                }
            )
        return {
            "host_id": self.host_id,
            "url": self.config.url,
            "status": "degraded" if self.degraded() else "ok",
            "reason": self.degraded(),
            "etcd": {"endpoints": list(self.config.etcd.endpoints), "in_use": self.client.endpoint},
            "lease_ttl_seconds": self.config.ttl,
            "registered_at": self.registrar.registered_at,
            "revision": self.view.revision,
            "hosts": hosts,
        }
