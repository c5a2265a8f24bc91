"""GPU leases: at most one holder (a one-off task or a session) per GPU, routed by difficulty, with drain."""

from __future__ import annotations

import logging
from collections.abc import Callable
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
    model: str = ""  # the model the holder runs (GPU time is counted by model)


# Told each lease that ends (not a repeated release) and the seconds it lasted.
ReleaseObserver = Callable[[Lease, float], None]


@dataclass(frozen=True)
class Drain:
    """A GPU that takes no new leases, why, and whether gpud drained it for a hardware fault (mark_unhealthy)."""

    gpu: Gpu
    reason: str
    unhealthy: bool


# Told every drain in force after each change of one (drain, undrain, mark_unhealthy): rare, never while leasing.
DrainObserver = Callable[[list[Drain]], None]


class Scheduler:
    """Hands out GPUs by difficulty tag; a low task never lands on a high GPU and vice versa."""

    def __init__(
        self, inventory: GpuInventory, clock: Clock | None = None, on_release: ReleaseObserver | None = None
    ) -> None:
        self._inventory = inventory
        self._clock = clock or SystemClock()
        self._on_release = on_release  # told each ended lease and how long it lasted (GPU-seconds)
        self._leases: dict[int, Lease] = {}
        self._drained: set[int] = set()
        self._drain_reasons: dict[int, str] = {}
        self._unhealthy: set[int] = set()  # auto-drained for a hardware fault (see mark_unhealthy())
        self._withheld: str | None = None  # why no new lease is granted now (see withhold())
        self._reserved: dict[int, str] = {}  # GPU -> the only holder that may lease it next (see reserve())
        self._on_drains: DrainObserver | None = None  # see watch_drains()

    def acquire(self, difficulty: str, holder: str, kind: str, model: str = "") -> Lease:
        """Lease the lowest-numbered free, undrained GPU tagged `difficulty`, or raise Unavailable."""
        gpu = self._free(difficulty, holder)
        lease = Lease(gpu=gpu, holder=holder, kind=kind, acquired_at=self._clock.time(), model=model)
        self._leases[gpu.index] = lease
        self._reserved = {index: keeper for index, keeper in self._reserved.items() if keeper != holder}
        logger.info("GPU %d (%s) leased to %s %s", gpu.index, difficulty, kind, holder)
        return lease

    def check(self, difficulty: str) -> None:
        """Raise what acquire() would raise now, leasing nothing (work that must wait before it needs the GPU)."""
        self._free(difficulty)

    def adopt(self, index: int, holder: str, kind: str, model: str = "") -> Lease:
        """Lease a GPU to work found running on it after gpud's restart (drained or not); Conflict when it is
        already leased: a GPU never has two holders, so the second container found on it must be stopped."""
        gpu = self._require(index)
        held = self._leases.get(index)
        if held is not None:
            raise Conflict(f"GPU {index} is already leased to {held.kind} {held.holder}", code="gpu_already_leased")
        lease = Lease(gpu=gpu, holder=holder, kind=kind, acquired_at=self._clock.time(), model=model)
        self._leases[index] = lease
        logger.info("GPU %d leased to %s %s (adopted after a restart)", index, kind, holder)
        return lease

    def withhold(self, reason: str | None) -> None:
        """While `reason` is set no lease is granted (adopt() still works): gpud does not know yet which GPUs
        the work that survived its restart holds. None grants leases again."""
        self._withheld = reason

    def reserve(self, index: int, holder: str) -> None:
        """Keep a GPU for `holder` (new work ending the idle session on it): once released, only an acquire by
        `holder` takes it, so no other submission slips in between the release and that acquire."""
        self._reserved[index] = holder

    def unreserve(self, index: int, holder: str) -> None:
        """Drop `holder`'s reservation of a GPU (leased, or given up); anyone's again."""
        if self._reserved.get(index) == holder:
            del self._reserved[index]

    def eligible(self, difficulty: str) -> list[Gpu]:
        """The GPUs tagged `difficulty` that take new leases (not drained, not unhealthy), held or not."""
        unhealthy = self._inventory.unhealthy()
        return [
            gpu
            for gpu in self._inventory.gpus
            if gpu.difficulty == difficulty and gpu.index not in self._drained and gpu.index not in unhealthy
        ]

    def _free(self, difficulty: str, holder: str | None = None) -> Gpu:
        if self._withheld is not None:
            raise Unavailable(self._withheld, code="gpus_not_reconciled", retry_after=RETRY_AFTER_SECONDS)
        fitting = [gpu for gpu in self._inventory.gpus if gpu.difficulty == difficulty]
        if not fitting:
            raise Unavailable(
                f"no GPU on this host is tagged {difficulty!r}",
                code="no_gpu_for_difficulty",
                retry_after=RETRY_AFTER_SECONDS,
            )
        free = [
            gpu
            for gpu in self.eligible(difficulty)
            if gpu.index not in self._leases and self._reserved.get(gpu.index, holder) == holder
        ]
        kept = [gpu for gpu in free if gpu.index in self._reserved]  # only this holder's pass the filter above
        if kept or free:
            return (kept or free)[0]  # a GPU kept for this holder first: it was freed for it
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
            if self._on_release is not None:
                self._on_release(lease, self._clock.time() - lease.acquired_at)

    def lease_of(self, index: int) -> Lease | None:
        """The lease currently holding a GPU, if any."""
        return self._leases.get(index)

    def leases(self) -> list[Lease]:
        """Every current lease."""
        return list(self._leases.values())

    def is_drained(self, index: int) -> bool:
        """Whether a GPU takes no new leases."""
        return index in self._drained

    def drain(self, index: int, reason: str = "operator") -> None:
        """Take no new leases on a GPU; work already on it finishes. An unhealthy GPU keeps its health reason."""
        self._require(index)
        before = self._drain_state(index)
        self._drained.add(index)
        if index not in self._unhealthy:
            self._drain_reasons[index] = reason
        self._drains_changed(index, before)

    def mark_unhealthy(self, index: int, reason: str) -> None:
        """Auto-drain a GPU for a hardware fault (e.g. `xid 79`): no new leases until an operator undrains it."""
        self._require(index)
        before = self._drain_state(index)
        self._drained.add(index)
        self._unhealthy.add(index)
        self._drain_reasons[index] = reason
        self._drains_changed(index, before)

    def undrain(self, index: int) -> None:
        """Let a drained GPU take leases again; clears an unhealthy mark too (the operator has dealt with it)."""
        self._require(index)
        before = self._drain_state(index)
        self._drained.discard(index)
        self._unhealthy.discard(index)
        self._drain_reasons.pop(index, None)
        self._drains_changed(index, before)

    def drains(self) -> list[Drain]:
        """Every drained GPU, by index, with its reason and whether it is unhealthy."""
        return [
            Drain(gpu, self._drain_reasons.get(gpu.index, "operator"), gpu.index in self._unhealthy)
            for gpu in self._inventory.gpus
            if gpu.index in self._drained
        ]

    def watch_drains(self, observer: DrainObserver | None) -> None:
        """Tell `observer` every drain in force after each change (the composition root saves them, so they
        outlive a restart); None stops telling."""
        self._on_drains = observer

    def _drain_state(self, index: int) -> tuple[bool, str | None, bool]:
        return index in self._drained, self._drain_reasons.get(index), index in self._unhealthy

    def _drains_changed(self, index: int, before: tuple[bool, str | None, bool]) -> None:
        # Only a real change is told: draining a drained GPU again writes nothing.
        if self._on_drains is not None and self._drain_state(index) != before:
            self._on_drains(self.drains())

    def drain_reason(self, index: int) -> str | None:
        """Why a GPU is drained (`operator`, or the fault that auto-drained it); None when it is not."""
        return self._drain_reasons.get(index) if index in self._drained else None

    def is_healthy(self, index: int) -> bool:
        """False from an auto-drain (mark_unhealthy) until the GPU is undrained."""
        return index not in self._unhealthy

    def _require(self, index: int) -> Gpu:
        gpu = self._inventory.get(index)
        if gpu is None:
            raise NotFound(f"no GPU {index} on this host", code="gpu_not_found")
        return gpu
