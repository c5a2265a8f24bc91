"""Host ids for workers: each session and each one-off gets a uid (gid = same number) of its own.

A worker's directories on the host (its session socket directory, its one-off input) are 0700 and owned by its
uid, and gpud accepts a session socket connection only from that uid (SO_PEERCRED). So one worker cannot enter,
connect to or read another's, and no local user can either. The ids come from GPUD_WORKER_UID_RANGE, a range no
real user or subordinate-uid range uses. A preset may instead ask for root (unisolated, the operator's explicit
choice) or a fixed numeric `uid[:gid]` (shared by every worker of that preset).
"""

from __future__ import annotations

import heapq
import logging
import os
from dataclasses import dataclass

from gpud.errors import Unavailable

logger = logging.getLogger(__name__)


class WorkerIdsExhausted(Unavailable):
    """Every uid of GPUD_WORKER_UID_RANGE is in use by a live worker."""

    code = "worker_ids_exhausted"


@dataclass(frozen=True)
class WorkerUser:
    """The host uid/gid one worker runs as; `holder` is set when the uid was allocated for it."""

    uid: int
    gid: int
    holder: str | None = None

    @property
    def spec(self) -> str:
        """`uid:gid`, as container specs take it."""
        return f"{self.uid}:{self.gid}"


def parse_preset_user(user: str) -> WorkerUser:
    """A preset's validated `user` ("root", "uid" or "uid:gid") as ids; a lone uid gets the same gid."""
    if user == "root":
        return WorkerUser(0, 0)
    uid, _, gid = user.partition(":")
    return WorkerUser(int(uid), int(gid or uid))


class WorkerIds:
    """Hands out the lowest free uid of a range, one per holder (a session or a one-off task), and takes it back."""

    def __init__(self, first: int, last: int, *, can_switch: bool | None = None) -> None:
        if not 0 < first <= last:
            raise ValueError(f"bad worker uid range {first}-{last}")
        self.first, self.last = first, last
        # Only root can run a worker as another uid and hand it its directories; otherwise workers run as gpud's
        # own user (the process runtime then refuses them unless unisolated workers are allowed).
        self.can_switch = os.geteuid() == 0 if can_switch is None else can_switch
        self._by_holder: dict[str, int] = {}
        self._released: list[int] = []  # a heap of ids given back, below _next
        self._next = first

    @property
    def in_use(self) -> int:
        """How many ids are allocated now."""
        return len(self._by_holder)

    def for_preset(self, preset_user: str | None, holder: str) -> WorkerUser:
        """The user a worker of this preset runs as: its own allocated uid unless the preset names one."""
        if preset_user is not None:
            return parse_preset_user(preset_user)
        if not self.can_switch:
            return WorkerUser(os.geteuid(), os.getegid())
        uid = self.acquire(holder)
        return WorkerUser(uid, uid, holder)

    def acquire(self, holder: str) -> int:
        """The lowest free uid for `holder` (the same one again if it already holds one)."""
        if holder in self._by_holder:
            return self._by_holder[holder]
        if self._released:
            uid = heapq.heappop(self._released)
        elif self._next <= self.last:
            uid = self._next
            self._next += 1
        else:
            raise WorkerIdsExhausted(
                f"all {self.last - self.first + 1} worker uids of GPUD_WORKER_UID_RANGE "
                f"({self.first}-{self.last}) are in use; try again when a worker has ended",
                retry_after=5.0,
            )
        self._by_holder[holder] = uid
        return uid

    def reserve(self, uid: int, holder: str) -> WorkerUser | None:
        """Mark `uid` as `holder`'s: a worker found running as it after gpud's restart (its `gpud.uid` label), so it
        is never handed to another. None when another holder has it (two workers on one uid: one must go); a uid
        outside the range is not this allocator's (a preset's fixed user) and is returned unallocated."""
        if not self.first <= uid <= self.last:
            return WorkerUser(uid, uid)
        owner = next((h for h, held in self._by_holder.items() if held == uid), None)
        if owner is not None:
            return WorkerUser(uid, uid, holder) if owner == holder else None
        previous = self._by_holder.pop(holder, None)  # a holder has one uid: the one its worker runs as
        if previous is not None:
            heapq.heappush(self._released, previous)
        if uid >= self._next:
            for skipped in range(self._next, uid):  # the ids jumped over stay free, lowest first
                heapq.heappush(self._released, skipped)
            self._next = uid + 1
        else:
            self._released.remove(uid)
            heapq.heapify(self._released)
        self._by_holder[holder] = uid
        return WorkerUser(uid, uid, holder)

    def release(self, user: WorkerUser) -> None:
        """Give an allocated uid back once its worker is gone; fixed and root users are not allocated."""
        if user.holder is None:
            return
        uid = self._by_holder.pop(user.holder, None)
        if uid is None:
            return
        heapq.heappush(self._released, uid)  # every given-back id is below _next, so the heap's smallest is lowest
