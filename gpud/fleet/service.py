"""The Fleet service: registration, the watched view, where a session or task lives, where new work may go.

Built by the composition root only when GPUD_ETCD_ENDPOINTS is set; the API's fleet middleware asks it where a
request belongs (gpud/api/fleet.py) and forwards on its pooled connections (gpud/fleet/upstream.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gpud import __version__
from gpud.errors import ConfigError
from gpud.fleet.etcd import EtcdClient, EtcdError, EtcdOptions, EtcdUnavailable, sleep_or_stop
from gpud.fleet.local import LocalSource
from gpud.fleet.metrics import FleetMetrics
from gpud.fleet.registration import RETRY_INTERVAL, Registrar, record_key
from gpud.fleet.upstream import UpstreamPool
from gpud.fleet.view import HOSTS, PREFIX, WATCH_END, FleetView, GpuState, HostRecord
from gpud.gpu.inventory import GpuInventory
from gpud.gpu.scheduler import Scheduler
from gpud.metrics import Metrics
from gpud.settings import Settings
from gpud.work.service import TaskService

logger = logging.getLogger(__name__)

_HOST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# How long connecting to another host for a forwarded request may take before it counts as not answering.
CONNECT_TIMEOUT_SECONDS = 3.0
# An id with neither a claim in the view nor an owner record in etcd may have been created on another host a moment
# ago: its owner writes a new id's claim and owner record as soon as its registry has it (one etcd transaction,
# started in the next loop iteration: measured 7-10 ms after the client read the id, one etcd write on this
# loaded test machine; tests/fleet/test_publication.py), while the client may learn the id from the first event of
# the submission's stream and use it on another host a few ms later. This is how long such an id waits for its
# claim to arrive through the watch before this host answers 404 itself: about five times the measured delay (it
# was 150 ms when new ids were published on a 50 ms tick).
CLAIM_GRACE_SECONDS = 0.05
# How often the view is checked meanwhile.
CLAIM_POLL_SECONDS = 0.005


@dataclass(frozen=True)
class Route:
    """Where a request for a session or task goes: `local`, `remote` (to `url`), `lost` (its host is gone)."""

    where: str
    host: str | None = None
    url: str | None = None

    @property
    def netloc(self) -> str:
        """host:port of `url` (the Host header of a forwarded request)."""
        return urlsplit(self.url or "").netloc


LOCAL = Route("local")


@dataclass(frozen=True)
class FleetConfig:
    """Fleet mode's settings, checked."""

    host_id: str
    url: str
    key: str
    ttl: int
    etcd: EtcdOptions
    record_ttl: int = 86400

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
        for name in ("etcd_ca_file", "etcd_cert_file", "etcd_key_file"):
            file = getattr(settings, name)
            if file is not None and not os.access(file, os.R_OK):
                problems.append(f"{name}: {file} is not a readable file")
        if settings.etcd_username and settings.etcd_password is None:
            problems.append("etcd_password: required with etcd_username (GPUD_ETCD_PASSWORD or _FILE)")
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
        return cls(
            host_id,
            url,
            settings.fleet_key or "",
            settings.etcd_lease_ttl_seconds,
            options,
            settings.fleet_record_ttl_seconds,
        )


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
        self.local = LocalSource(tasks.sessions.registry, tasks.registry, self.gpu_states)
        self.registrar = Registrar(
            self.client,
            config.host_id,
            config.url,
            __version__,
            config.ttl,
            self.local.snapshot,
            self.local.status,
            config.record_ttl,
        )
        # Each id added or forgotten reaches the registrar as it happens (no scan of every retained task per tick).
        self.local.listen(self.registrar.changed)
        self.metrics = FleetMetrics(metrics.registry, lambda: float(len(self.view.hosts)))
        self.watch_error: str | None = "not listed yet"
        self.upstream = UpstreamPool(CONNECT_TIMEOUT_SECONDS)
        self._loops: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    def gpu_states(self) -> tuple[GpuState, ...]:
        """This host's GPUs as its record shows them (polled at each sync tick: a handful of GPUs)."""
        unhealthy = self._inventory.unhealthy()
        return tuple(
            GpuState(
                index=gpu.index,
                tier=gpu.difficulty,
                leased=self._scheduler.lease_of(gpu.index) is not None,
                drained=self._scheduler.is_drained(gpu.index),
                healthy=gpu.index not in unhealthy,
            )
            for gpu in self._inventory.gpus
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
        self.upstream.close()

    async def _watch_forever(self) -> None:
        """List /gpud/, then follow the watch from that revision; after an error list again (a fresh view)."""
        while not self._stop.is_set():
            try:
                kvs, revision = await self.client.get_prefix(PREFIX, WATCH_END)
                self.view.load(kvs, revision)
                self.watch_error = None
                async for event in self.client.watch(PREFIX, revision + 1, WATCH_END):
                    self.view.apply(event)
            except (EtcdUnavailable, EtcdError) as exc:
                if str(exc) != self.watch_error:
                    logger.warning("fleet: watch of %s failed (listing again): %s", PREFIX, exc)
                self.watch_error = str(exc)
            if await sleep_or_stop(self._stop, RETRY_INTERVAL if self.watch_error else 0.0):
                return

    def degraded(self) -> str | None:
        """Why this host is not a full fleet member now (etcd unreachable), or None."""
        problem = self.registrar.error or self.watch_error
        return f"etcd_unreachable: {problem}" if problem else None

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
        """route(); for an id this host's view does not know, its durable owner record, read from etcd (one
        linearizable read, no waiting): its owner when the record names one, LOCAL (this host's own 404) when
        none does or etcd does not answer."""
        found = self.route(kind, item)
        if found is not LOCAL or self.degraded() is not None:
            return found
        try:
            record = await self.client.get(record_key(kind, item))
            owner = record.value.decode(errors="replace") if record is not None else None
            if owner is None:
                return await self._claim_arriving(kind, item)
            if owner == self.host_id:
                return LOCAL
            host = self.view.hosts.get(owner)
            if host is None:  # gone, or joined after this host's view was last updated: ask etcd too
                found_host = await self.client.get(HOSTS + owner)
                host = HostRecord.parse(owner, found_host.value) if found_host is not None else None
        except (EtcdUnavailable, EtcdError, ValueError, KeyError, TypeError) as exc:
            logger.debug("fleet: could not read the owner record of %s %s: %s", kind, item, exc)
            return LOCAL
        return Route("remote", owner, host.url) if host is not None else Route("lost", owner)

    async def _claim_arriving(self, kind: str, item: str) -> Route:
        """route() once the claim of a just-created id arrives through the watch; LOCAL after CLAIM_GRACE_SECONDS."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLAIM_GRACE_SECONDS
        while loop.time() < deadline:
            await asyncio.sleep(CLAIM_POLL_SECONDS)
            found = self.route(kind, item)
            if found is not LOCAL:
                return found
        return LOCAL

    def health(self) -> tuple[dict[str, Any], str | None]:
        """/health's fleet part, and why this host is degraded (etcd unreachable), or None."""
        reason = self.degraded()
        return {"host_id": self.host_id, "hosts": len(self.view.hosts), "reason": reason}, reason

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
