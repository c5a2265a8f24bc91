"""This host's entries in etcd: its record and its claims, all under one lease that it keeps alive.

A loop compares what the host has now (GPU states, the sessions and tasks its registries hold) with what it last
published, and writes the difference: so a change is published within one SYNC_INTERVAL, and a burst of changes
is one write per id (the debounce). If etcd stops answering, or the lease expired meanwhile, the host registers
again from scratch once etcd answers: a new lease, its record and every claim put again.

Each claim has a durable twin, its owner record (`/gpud/~records/<kind>/<id>` = host id), written and removed in
the same transaction but under a second, long lease (GPUD_FLEET_RECORD_TTL_SECONDS, a day by default) renewed
while the host lives: when the host dies its claims go with its short lease, its records stay, and any host, even
one that joined later, tells "its host is gone" (410) from "never existed" (404). They cannot pile up: a record
goes when its session or task leaves the host's memory; a host that never comes back loses them all when the long
lease runs out; a host that restarts with the same id finds its previous records lease, moves what it still has
to its new one and revokes the old one, which takes every record of what it lost with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from gpud.fleet.etcd import EtcdClient, EtcdError, EtcdUnavailable, delete_op, put_op, sleep_or_stop
from gpud.fleet.view import HOSTS, KINDS, PREFIX, RECORD_LEASES, RECORDS, GpuState, HostRecord

logger = logging.getLogger(__name__)

# How often local state is compared with what was published.
SYNC_INTERVAL = 0.05
# How long to wait before trying etcd again after it failed.
RETRY_INTERVAL = 1.0
# Ids written per etcd transaction (two keys each: etcd's default limit is 128 operations).
TXN_IDS = 50
# The records lease is renewed this often at most (and every third of its TTL when that is shorter).
RECORDS_RENEW_SECONDS = 600.0


@dataclass(frozen=True)
class LocalState:
    """What this host publishes: GPU states, and the ids of the sessions and tasks it answers for."""

    gpus: tuple[GpuState, ...]
    sessions: frozenset[str]
    tasks: frozenset[str]
    live_sessions: int = 0
    active_tasks: int = 0


@dataclass
class Published:
    """What etcd holds for this host under `lease` (as far as this host knows)."""

    lease: int = 0
    record: HostRecord | None = None
    claims: dict[str, set[str]] = field(default_factory=lambda: {"sessions": set(), "tasks": set()})


class Registrar:
    """Keeps this host's record and claims in etcd, under a lease renewed every TTL/3."""

    def __init__(
        self,
        client: EtcdClient,
        host_id: str,
        url: str,
        version: str,
        ttl: int,
        snapshot: Callable[[], LocalState],
        record_ttl: int = 86400,
    ) -> None:
        self._client = client
        self.host_id = host_id
        self._url = url
        self._version = version
        self._ttl = ttl
        self._record_ttl = record_ttl
        self._snapshot = snapshot
        self._published = Published()
        self.records_lease = 0  # the long lease of this host's owner records (kept across re-registrations)
        self.error: str | None = "not registered yet"
        self.registered_at: float | None = None
        self._stop = asyncio.Event()

    @property
    def lease(self) -> int:
        """The lease this host's keys live under (0 while unregistered)."""
        return self._published.lease

    async def run(self) -> None:
        """Forever: register, then sync and renew; on any etcd failure start over once etcd answers again."""
        while not self._stop.is_set():
            try:
                await self._register()
                await first_failure(self._sync_forever(), self._renew_forever(), self._renew_records_forever())
            except (EtcdUnavailable, EtcdError) as exc:
                if str(exc) != self.error:  # each new reason once (a host that never registered logs it too)
                    logger.warning("fleet: etcd unreachable, serving this host's own work: %s", exc)
                self.error = str(exc)
                self._published = Published()
                if await sleep_or_stop(self._stop, RETRY_INTERVAL):
                    return

    async def _register(self) -> None:
        lease = await self._client.grant(self._ttl)
        self._published = Published(lease=lease)
        previous = await self._records_lease()
        await self._sync_once()
        if previous:
            # What this host still has was just moved to the new records lease: the old one holds only the
            # records of what it lost (e.g. in a restart), and ending it removes them.
            await self._client.revoke(previous)
            logger.info("fleet: ended the records lease %x of this host's previous run", previous)
        if self.error is not None:
            logger.info("fleet: registered as %s at %s (lease %x, ttl %ds)", self.host_id, self._url, lease, self._ttl)
        self.error = None
        self.registered_at = time.time()

    async def _records_lease(self) -> int:
        """Keep (or take) the long lease of the owner records; the previous run's lease to end, or 0."""
        if self.records_lease and await self._client.keepalive(self.records_lease) > 0:
            return 0
        found = await self._client.get(RECORD_LEASES + self.host_id)
        previous = int(found.value) if found is not None and found.value.isdigit() else 0
        if previous == self.records_lease:
            previous = 0  # this process's own lease, expired while etcd was away: nothing left to end
        self.records_lease = await self._client.grant(self._record_ttl)
        await self._client.put(RECORD_LEASES + self.host_id, str(self.records_lease), self.records_lease)
        return previous

    async def _renew_records_forever(self) -> None:
        while not await sleep_or_stop(self._stop, min(RECORDS_RENEW_SECONDS, self._record_ttl / 3)):
            if await self._client.keepalive(self.records_lease) <= 0:
                raise EtcdError(f"records lease {self.records_lease:x} expired; registering again")

    async def _sync_forever(self) -> None:
        while not await sleep_or_stop(self._stop, SYNC_INTERVAL):
            await self._sync_once()

    async def _renew_forever(self) -> None:
        while not await sleep_or_stop(self._stop, self._ttl / 3):
            if await self._client.keepalive(self._published.lease) <= 0:
                raise EtcdError(f"lease {self._published.lease:x} expired; registering again")

    async def _sync_once(self) -> None:
        """Write what changed since the last sync: new claims first (a client may use an id at once), then the
        record, then claims that ended."""
        now = self._snapshot()
        published = self._published
        lease, records = published.lease, self.records_lease
        for kind, ids in (("sessions", now.sessions), ("tasks", now.tasks)):
            added = ids - published.claims[kind]
            if added:
                claims = [put_op(f"{PREFIX}{kind}/{i}", self.host_id, lease) for i in added]
                owners = [put_op(record_key(kind, i), self.host_id, records) for i in added]
                await self._txns(claims, owners)
                published.claims[kind] |= added
        record = HostRecord(
            self.host_id, self._url, self._version, now.gpus, time.time(), now.live_sessions, now.active_tasks
        )
        # Rewritten when anything in it changed, and every TTL anyway, so `updated` says when it was last seen.
        last = published.record
        if (
            last is None
            or record.updated - last.updated >= self._ttl
            or replace(last, updated=record.updated) != record
        ):
            await self._client.put(HOSTS + self.host_id, record.to_json(), lease)
            published.record = record
        for kind, ids in (("sessions", now.sessions), ("tasks", now.tasks)):
            gone = published.claims[kind] - ids
            if gone:
                claims = [delete_op(f"{PREFIX}{kind}/{i}") for i in gone]
                await self._txns(claims, [delete_op(record_key(kind, i)) for i in gone])
                published.claims[kind] -= gone

    async def _txns(self, claims: list[dict[str, Any]], owners: list[dict[str, Any]]) -> None:
        """Each claim's op with its owner record's, in transactions of TXN_IDS ids sent together."""
        batches = [claims[i : i + TXN_IDS] + owners[i : i + TXN_IDS] for i in range(0, len(claims), TXN_IDS)]
        await asyncio.gather(*(self._client.txn(batch) for batch in batches))

    async def stop(self) -> None:
        """Leave the fleet: revoke the lease, so this host's record and claims go at once."""
        self._stop.set()
        if self._published.lease:
            try:
                await self._client.revoke(self._published.lease)
            except EtcdUnavailable as exc:
                logger.info("fleet: could not revoke the lease (etcd unreachable; it expires by itself): %s", exc)


def record_key(kind: str, item: str) -> str:
    """The durable owner record of a session or task."""
    assert kind in KINDS
    return f"{RECORDS}{kind}/{item}"


async def first_failure(*coros: Coroutine[Any, Any, None]) -> None:
    """Run coroutines together until all end or one fails; then cancel the rest and raise its error."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
