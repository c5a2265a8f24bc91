"""Sessions: a long-lived worker keeping a model loaded, its state machine, and its FIFO queue of tasks."""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpud.clock import Clock, wall_of
from gpud.errors import Busy, Gone, NotFound
from gpud.gpu.scheduler import Lease
from gpud.settings.presets import Preset
from gpud.work.event import EventType
from gpud.work.task import Task, TaskError, TaskStatus

logger = logging.getLogger(__name__)


class SessionState(enum.StrEnum):
    """Where a session is in its life."""

    STARTING = "starting"  # container starting, model loading
    READY = "ready"  # worker idle, waiting for tasks (the original design's WAITING)
    WORKING = "working"  # a task is running
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


# The only moves a session may make. STARTING again from READY/WORKING is a restart of a stuck worker.
ALLOWED_MOVES: dict[SessionState, frozenset[SessionState]] = {
    SessionState.STARTING: frozenset({SessionState.READY, SessionState.STOPPING, SessionState.FAILED}),
    SessionState.READY: frozenset(
        {SessionState.WORKING, SessionState.STOPPING, SessionState.FAILED, SessionState.STARTING}
    ),
    SessionState.WORKING: frozenset(
        {SessionState.READY, SessionState.STOPPING, SessionState.FAILED, SessionState.STARTING}
    ),
    SessionState.STOPPING: frozenset({SessionState.STOPPED, SessionState.FAILED}),
    SessionState.STOPPED: frozenset(),
    SessionState.FAILED: frozenset(),
}
ENDED = frozenset({SessionState.STOPPED, SessionState.FAILED})
_PER_TASK = {SessionState.READY, SessionState.WORKING}


class IllegalMove(RuntimeError):
    """A bug: code tried a state change the table does not allow."""


@dataclass(eq=False)
class Session:
    """One session's record: identity, state, queue, and timing (monotonic readings of `clock`, shown as wall
    time in reports). SessionManager drives it."""

    id: str
    preset: Preset
    difficulty: str
    lease: Lease
    clock: Clock
    state: SessionState = SessionState.STARTING
    queue: collections.deque[Task] = field(default_factory=collections.deque)
    current: Task | None = None
    container_id: str | None = None
    created: float = field(init=False)
    last_active: float = field(init=False)
    ended: float | None = None
    end_reason: str | None = None
    tasks_run: int = 0
    restarts: int = 0
    ready_info: dict[str, Any] = field(default_factory=dict)
    # Set to a reason code when the session must end (kill, idle, lifetime, shutdown).
    stop_reason: str | None = None
    # Called when the session changes in a way worth recording (the registry records it).
    on_change: Callable[[Session], None] | None = None

    def __post_init__(self) -> None:
        self.created = self.last_active = self.clock.monotonic()

    def move(self, to: SessionState) -> None:
        """Change state, only along the table's moves."""
        if to not in ALLOWED_MOVES[self.state]:
            raise IllegalMove(f"session {self.id}: {self.state} -> {to} is not allowed")
        # READY <-> WORKING happens at every task (whose own start and end lines name the session): DEBUG.
        level = logging.DEBUG if {self.state, to} == _PER_TASK else logging.INFO
        logger.log(level, "session %s: %s -> %s", self.id, self.state.value, to.value)
        self.state = to
        if to in ENDED:
            self.ended = self.clock.monotonic()
        if to is not SessionState.WORKING:  # READY after a task records its counters; WORKING adds nothing
            self.changed()

    def changed(self) -> None:
        """Tell the recorder the session changed (state, counters, last activity)."""
        if self.on_change is not None:
            self.on_change(self)

    @property
    def is_over(self) -> bool:
        """Whether the session has ended."""
        return self.state in ENDED

    def expires_at(self, max_lifetime: float) -> float:
        """When (clock.monotonic) the session stops accepting tasks."""
        return self.created + max_lifetime

    def idle_deadline(self, idle_timeout: float) -> float:
        """When (clock.monotonic) an idle session ends, counting from the last task or keepalive."""
        return self.last_active + idle_timeout

    def touch(self) -> None:
        """Record activity (a task finished, a task queued, a keepalive)."""
        self.last_active = self.clock.monotonic()

    def check_accepts(self, max_lifetime: float, queue_max: int) -> None:
        """Raise the error a new task for this session gets, if it cannot be queued."""
        if self.is_over or self.stop_reason is not None:
            reason = self.end_reason or self.stop_reason
            if reason == "evicted":  # its own code: a client may simply open a new session
                raise Gone(
                    f"session {self.id} was evicted: it was idle when new work needed its GPU", code="session_evicted"
                )
            raise Gone(f"session {self.id} has ended ({reason})", code="session_ended")
        if self.clock.monotonic() >= self.expires_at(max_lifetime):
            raise Gone(f"session {self.id} reached its max lifetime and takes no new tasks", code="session_expired")
        if len(self.queue) >= queue_max:
            raise Busy(
                f"session {self.id} already has {len(self.queue)} task(s) waiting (SESSION_QUEUE_MAX_SIZE)",
                code="session_queue_full",
                retry_after=5.0,
            )

    def announce_positions(self) -> None:
        """Tell every queued task where it stands (1 = next)."""
        for position, task in enumerate(self.queue, start=1):
            task.emit(EventType.WORKER, status="queued", container_id=self.container_id, queue_position=position)

    def drop_queued(self, status: TaskStatus, error: TaskError) -> None:
        """End every task still waiting in the queue."""
        while self.queue:
            self.queue.popleft().finish(status, error=error)

    def report(self) -> dict[str, Any]:
        """The session as JSON for the API."""
        return {
            "session_id": self.id,
            "state": self.state.value,
            "model_id": self.preset.model_id,
            "task_preset": self.preset.name,
            "task_difficulty": self.difficulty,
            "gpu_id": self.lease.gpu.index,
            "gpu_uuid": self.lease.gpu.uuid,
            "container_id": self.container_id,
            "current_task": self.current.id if self.current else None,
            "queue": [task.id for task in self.queue],
            "queue_length": len(self.queue),
            "created_at": wall_of(self.clock, self.created),
            "last_activity": wall_of(self.clock, self.last_active),
            "ended_at": None if self.ended is None else wall_of(self.clock, self.ended),
            "end_reason": self.end_reason,
            "tasks_run": self.tasks_run,
            "restarts": self.restarts,
            "worker": self.ready_info,
        }


class SessionRecords(Protocol):
    """Where sessions are recorded durably (gpud.work.journal)."""

    def session_changed(self, session: Session) -> None:
        """Record the session as it is now."""

    def stored_session(self, session_id: str) -> Session | None:
        """An ended session rebuilt from its record, or None."""


class SessionRegistry:
    """Live sessions, and ended ones for a while (so their id answers 410, not 404); with `records`, each session
    is recorded as it changes, and one no longer in memory is read back from there."""

    def __init__(self, records: SessionRecords | None = None) -> None:
        self._sessions: dict[str, Session] = {}
        self._records = records
        self._watcher: Callable[[bool, Session], None] | None = None

    def watch(self, watcher: Callable[[bool, Session], None]) -> None:
        """Call `watcher(True, session)` when a session is added and `watcher(False, session)` when it is
        forgotten (fleet mode publishes the ids this host holds from these)."""
        self._watcher = watcher

    def add(self, session: Session) -> None:
        """Register a new session."""
        self._sessions[session.id] = session
        if self._watcher is not None:
            self._watcher(True, session)
        if self._records is not None:
            session.on_change = self._records.session_changed
            session.changed()

    def get(self, session_id: str) -> Session:
        """The session, or NotFound (one no longer in memory is read back from the records)."""
        session = self._sessions.get(session_id)
        if session is None and self._records is not None:
            session = self._records.stored_session(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}", code="session_not_found")
        return session

    def all(self) -> list[Session]:
        """Every known session, oldest first."""
        return sorted(self._sessions.values(), key=lambda s: s.created)

    def live(self) -> list[Session]:
        """Sessions not ended."""
        return [s for s in self._sessions.values() if not s.is_over]

    def purge(self, older_than: float) -> None:
        """Forget sessions that ended before the given clock.monotonic reading."""
        for session_id in [s.id for s in self._sessions.values() if s.ended is not None and s.ended < older_than]:
            session = self._sessions.pop(session_id)
            if self._watcher is not None:
                self._watcher(False, session)
