"""GPU leases for new work: a free GPU of the tier, or else the GPU of the least recently used idle session, ended
for it (GPUD_SESSION_EVICT_IDLE) rather than a 503 until that session's idle timeout."""

from __future__ import annotations

import asyncio
import logging

from gpud.errors import Unavailable
from gpud.gpu.scheduler import Lease, Scheduler
from gpud.metrics import Metrics
from gpud.settings import LiveConfig
from gpud.work.launch import STOP_GRACE_SECONDS
from gpud.work.sessions.manager import SessionManager
from gpud.work.sessions.record import Session, SessionState

logger = logging.getLogger(__name__)

EVICTED = "evicted"  # the session's stop and end reason
# How long new work waits for an evicted session's GPU: the worker's own exit on `shutdown` (1 s), the engine's
# stop grace, and the container's removal. Past it the work gets the 503 it would have got without eviction.
EVICTION_WAIT_SECONDS = STOP_GRACE_SECONDS + 10.0


class Capacity:
    """Leases GPUs to new sessions and one-offs; when every GPU of a tier is held by idle sessions, ends the least
    recently used of them and hands its GPU to the new work."""

    def __init__(
        self, scheduler: Scheduler, sessions: SessionManager, config: LiveConfig, metrics: Metrics | None = None
    ) -> None:
        self._scheduler = scheduler
        self._sessions = sessions
        self._config = config
        self._metrics = metrics
        self._kills: set[asyncio.Task[None]] = set()  # evictions still ending after their new work stopped waiting

    def check(self, difficulty: str) -> None:
        """Raise what acquire() would raise now, leasing and ending nothing: a tier full of idle sessions passes
        (the GPU is taken later, e.g. by a one-off once its model is fetched)."""
        try:
            self._scheduler.check(difficulty)
        except Unavailable as refused:
            if not self._may_evict(refused) or self.idle_victim(difficulty) is None:
                raise

    async def acquire(self, difficulty: str, holder: str, kind: str, model: str = "") -> Lease:
        """Lease a free GPU tagged `difficulty`; with none free, end the least recently used idle session on one
        and lease its GPU. Raises the scheduler's Unavailable (503) when there is no such session, or when it does
        not end within EVICTION_WAIT_SECONDS."""
        try:
            return self._scheduler.acquire(difficulty, holder, kind, model)
        except Unavailable as exc:
            if not self._may_evict(exc):
                raise
            refused = exc
        victim = self.idle_victim(difficulty)
        if victim is None:
            raise refused
        # Marked in the same event-loop step that found it idle: from here it takes no task (410 session_evicted)
        # and no other submission picks it. Its GPU is kept for `holder` alone once released.
        victim.stop_reason = EVICTED
        index = victim.lease.gpu.index
        self._scheduler.reserve(index, holder)
        logger.info(
            "evicting idle session %s (model %s) from GPU %d for a new %s: every GPU tagged %r is busy",
            victim.id, victim.preset.model_id, index, kind, difficulty,
        )  # fmt: skip
        if self._metrics is not None:
            self._metrics.sessions_evicted.inc()
        try:
            if not await self._ended(victim):
                logger.warning(
                    "session %s on GPU %d did not end within %.0fs of its eviction; the new %s gets a 503",
                    victim.id, index, EVICTION_WAIT_SECONDS, kind,
                )  # fmt: skip
                raise refused
            return self._scheduler.acquire(difficulty, holder, kind, model)
        finally:
            self._scheduler.unreserve(index, holder)

    def idle_victim(self, difficulty: str) -> Session | None:
        """The least recently used session that is ready, with no task running or queued and no stop asked, on a
        GPU tagged `difficulty` that takes leases (not drained, healthy), or None."""
        eligible = {gpu.index for gpu in self._scheduler.eligible(difficulty)}
        idle = [
            session
            for session in self._sessions.registry.live()
            if session.state is SessionState.READY
            and session.stop_reason is None
            and session.current is None
            and not session.queue
            and session.lease.gpu.index in eligible
            and self._scheduler.lease_of(session.lease.gpu.index) is session.lease
        ]
        return min(idle, key=lambda session: session.last_active, default=None)

    def _may_evict(self, refused: Unavailable) -> bool:
        """Only a tier that is full (not one withheld after a restart, or with no GPU at all), and only if on."""
        return refused.code == "no_gpu_available" and self._config.settings.session_evict_idle

    async def _ended(self, victim: Session) -> bool:
        """End the session as a kill does; whether its GPU was released within EVICTION_WAIT_SECONDS."""
        kill = asyncio.create_task(self._sessions.kill(victim, EVICTED), name=f"evict-{victim.id}")
        self._kills.add(kill)
        kill.add_done_callback(self._kills.discard)
        # asyncio.wait cancels nothing: new work that stops waiting (time-out, client gone) leaves the teardown be.
        await asyncio.wait({kill}, timeout=EVICTION_WAIT_SECONDS)
        return self._scheduler.lease_of(victim.lease.gpu.index) is None
