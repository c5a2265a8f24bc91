"""GPU leases: at most one holder (a one-off task or a session) per GPU, routed by difficulty, with drain."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gpud.clock import Clock, SystemClock
from gpud.errors import Conflict, NotFound, Unavailable
from gpud.gpu.inventory import Gpu, GpuInventory

logger = logging.getLogger(__name__)

# How long a client is told to wait before retrying when every fitting GPU is busy.
RETRY_AFTER_SECONDS = 5.0


@dataclass(frozen=True)
class Lease:
    """A GPU held by one task or session until released."""

    gpu: Gpu
    holder: str
    kind: str  # "task" or "session"
    acquired_at: float  # epoch seconds


class Scheduler:
    """Hands out GPUs by difficulty tag; a low task never lands on a high GPU and vice versa."""

    def __init__(self, inventory: GpuInventory, clock: Clock | None = None) -> None:
        self._inventory = inventory
        self._clock = clock or SystemClock()
        self._leases: dict[int, Lease] = {}
        self._drained: set[int] = set()
        self._withheld: str | None = None  # why no new lease is granted now (see withhold())

    def acquire(self, difficulty: str, holder: str, kind: str) -> Lease:
        """Lease the lowest-numbered free, undrained GPU tagged `difficulty`, or raise Unavailable."""
        gpu = self._free(difficulty)
        lease = Lease(gpu=gpu, holder=holder, kind=kind, acquired_at=self._clock.time())
        self._leases[gpu.index] = lease
        logger.info("GPU %d (%s) leased to %s %s", gpu.index, difficulty, kind, holder)
        return lease

    def check(self, difficulty: str) -> None:
        """Raise what acquire() would raise now, leasing nothing (work that must wait before it needs the GPU)."""
        self._free(difficulty)

    def adopt(self, index: int, holder: str, kind: str) -> Lease:
        """Lease a GPU to work found running on it after gpud's restart (drained or not); Conflict when it is
        already leased: a GPU never has two holders, so the second container found on it must be stopped."""
        gpu = self._require(index)
        held = self._leases.get(index)
        if held is not None:
            raise Conflict(f"GPU {index} is already leased to {held.kind} {held.holder}", code="gpu_already_leased")
        lease = Lease(gpu=gpu, holder=holder, kind=kind, acquired_at=self._clock.time())
        self._leases[index] = lease
        logger.info("GPU %d leased to %s %s (adopted after a restart)", index, kind, holder)
        return lease

    def withhold(self, reason: str | None) -> None:
        """While `reason` is set no lease is granted (adopt() still works): gpud does not know yet which GPUs
        the work that survived its restart holds. None grants leases again."""
        self._withheld = reason

    def _free(self, difficulty: str) -> Gpu:
        if self._withheld is not None:
            raise Unavailable(self._withheld, code="gpus_not_reconciled", retry_after=RETRY_AFTER_SECONDS)
        fitting = [gpu for gpu in self._inventory.gpus if gpu.difficulty == difficulty]
        if not fitting:
            raise Unavailable(
                f"no GPU on this host is tagged {difficulty!r}",
                code="no_gpu_for_difficulty",
                retry_after=RETRY_AFTER_SECONDS,
            )
        unhealthy = self._inventory.unhealthy()
        for gpu in fitting:
            if gpu.index not in self._leases and gpu.index not in self._drained and gpu.index not in unhealthy:
                return gpu
        raise Unavailable(
            f"all {len(fitting)} GPU(s) tagged {difficulty!r} are busy or drained",
            code="no_gpu_available",
            retry_after=RETRY_AFTER_SECONDS,
        )

    def release(self, lease: Lease) -> None:
        """Give a GPU back; releasing twice is harmless (cleanup paths may overlap)."""
        if self._leases.get(lease.gpu.index) is lease:
            del self._leases[lease.gpu.index]
            logger.info("GPU %d released by %s %s", lease.gpu.index, lease.kind, lease.holder)

    def lease_of(self, index: int) -> Lease | None:
        """The lease currently holding a GPU, if any."""
        return self._leases.get(index)

    def leases(self) -> list[Lease]:
        """Every current lease."""
        return list(self._leases.values())

    def is_drained(self, index: int) -> bool:
        """Whether a GPU takes no new leases."""
        return index in self._drained

    def drain(self, index: int) -> None:
        """Take no new leases on a GPU; work already on it finishes."""
        self._require(index)
        self._drained.add(index)

    def undrain(self, index: int) -> None:
        """Let a drained GPU take leases again."""
        self._require(index)
        self._drained.discard(index)

    def _require(self, index: int) -> Gpu:
        gpu = self._inventory.get(index)
        if gpu is None:
            raise NotFound(f"no GPU {index} on this host", code="gpu_not_found")
        return gpu
