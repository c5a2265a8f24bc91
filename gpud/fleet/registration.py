"""This host's entries in etcd: its record and its claims, all under one lease that it keeps alive.

Registering puts the record and every claim from a full snapshot of what the host holds. From then on the
registries tell of each session and task id added or forgotten (gpud/fleet/local.py): the changes pile up in a
pending set and the sync loop, woken at the first one, publishes the difference at once (new claims in the next
loop iteration, not the next tick). Changes that arrive while a write is in flight go together in the next one, so
a burst is one transaction per TXN_IDS ids (the debounce). The record's status (GPU states, live counts) is
compared every SYNC_INTERVAL: it costs the GPUs and the live work, never the retained ended tasks. If etcd stops
answering, or the lease expired meanwhile, the host registers again from scratch once etcd answers: a new lease,
its record and every claim put again, from a new snapshot.

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
from gpud.fleet.local import HostStatus, LocalState
from gpud.fleet.view import HOSTS, KINDS, PREFIX, RECORD_LEASES, RECORDS, HostRecord

logger = logging.getLogger(__name__)

# How often the record's status (GPU states, live counts) is compared with what was published; new and forgotten
# ids do not wait for it (they wake the sync loop).
SYNC_INTERVAL = 0.05
# How long to wait before trying etcd again after it failed.
RETRY_INTERVAL = 1.0
# Ids written per etcd transaction (two keys each: etcd's default limit is 128 operations).
TXN_IDS = 50
# The records lease is renewed this often at most (and every third of its TTL when that is shorter).
RECORDS_RENEW_SECONDS = 600.0


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
        status: Callable[[], HostStatus],
        record_ttl: int = 86400,
    ) -> None:
        self._client = client
        self.host_id = host_id
        self._url = url
        self._version = version
        self._ttl = ttl
        self._record_ttl = record_ttl
        self._snapshot = snapshot
        self._status = status
        self._published = Published()
        # Ids added (True) or forgotten (False) since the last write, the last word for each; recorded only while
        # registered (a registration from scratch starts from a full snapshot anyway).
        self._pending: dict[str, dict[str, bool]] = {"sessions": {}, "tasks": {}}
        self._tracking = False
        self._wake = asyncio.Event()
        self.snapshots = 0  # full snapshots taken (one per registration)
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
                self._tracking = False
                self._pending = {"sessions": {}, "tasks": {}}
                if await sleep_or_stop(self._stop, RETRY_INTERVAL):
                    return

    async def _register(self) -> None:
        lease = await self._client.grant(self._ttl)
        self._published = Published(lease=lease)
        previous = await self._records_lease()
        await self._sync_once(self._take_snapshot())
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

    def changed(self, kind: str, added: bool, item: str) -> None:
        """A session or task id was added to (or forgotten by) this host: publish it soon (the sync loop wakes)."""
        if self._tracking:
            self._pending[kind][item] = added
            self._wake.set()

    def _take_snapshot(self) -> LocalState:
        """Everything this host holds now; what was pending is in it (and later changes pile up from here)."""
        self.snapshots += 1
        state = self._snapshot()
        self._pending = {"sessions": {}, "tasks": {}}
        self._tracking = True
        return state

    async def _sync_forever(self) -> None:
        while not self._stop.is_set():
            if not any(self._pending.values()):
                try:
                    async with asyncio.timeout(SYNC_INTERVAL):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            if self._stop.is_set():
                return
            await self._sync_once()

    async def _renew_forever(self) -> None:
        while not await sleep_or_stop(self._stop, self._ttl / 3):
            if await self._client.keepalive(self._published.lease) <= 0:
                raise EtcdError(f"lease {self._published.lease:x} expired; registering again")

    async def _sync_once(self, full: LocalState | None = None) -> None:
        """Write what changed since the last write (everything in `full`, when registering): new claims first (a
        client may use an id at once), then the record, then claims that ended."""
        self._wake.clear()
        published = self._published
        if full is not None:
            added = {"sessions": set(full.sessions), "tasks": set(full.tasks)}
            gone = {kind: published.claims[kind] - ids for kind, ids in added.items()}
            status = full.status
        else:
            pending, self._pending = self._pending, {"sessions": {}, "tasks": {}}
            added = {kind: {i for i, new in ids.items() if new} for kind, ids in pending.items()}
            gone = {kind: {i for i, new in ids.items() if not new} for kind, ids in pending.items()}
            status = self._status()
        lease, records = published.lease, self.records_lease
        for kind, ids in added.items():
            new = ids - published.claims[kind]
            if new:
                claims = [put_op(f"{PREFIX}{kind}/{i}", self.host_id, lease) for i in new]
                owners = [put_op(record_key(kind, i), self.host_id, records) for i in new]
                await self._txns(claims, owners)
                published.claims[kind] |= new
        record = HostRecord(
            self.host_id, self._url, self._version, status.gpus, time.time(), status.live_sessions, status.active_tasks
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
        for kind, ids in gone.items():
            ended = ids & published.claims[kind]
            if ended:
                claims = [delete_op(f"{PREFIX}{kind}/{i}") for i in ended]
                await self._txns(claims, [delete_op(record_key(kind, i)) for i in ended])
                published.claims[kind] -= ended

    async def _txns(self, claims: list[dict[str, Any]], owners: list[dict[str, Any]]) -> None:
        """Each claim's op with its owner record's, in transactions of TXN_IDS ids sent together."""
        batches = [claims[i : i + TXN_IDS] + owners[i : i + TXN_IDS] for i in range(0, len(claims), TXN_IDS)]
        await asyncio.gather(*(self._client.txn(batch) for batch in batches))

    async def stop(self) -> None:
        """Leave the fleet: revoke the lease, so this host's record and claims go at once."""
        self._stop.set()
        self._wake.set()
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
