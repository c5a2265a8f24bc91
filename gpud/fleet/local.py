"""What this host publishes, read cheaply: the registries tell of each id added and forgotten, so a sync tick costs
the GPUs and the live sessions and tasks, never the (possibly tens of thousands of) retained ended ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpud.fleet.view import GpuState
from gpud.work.registry import TaskRegistry
from gpud.work.sessions.record import Session, SessionRegistry
from gpud.work.task import Task

# Told (kind, added, id) for each session ("sessions") or task ("tasks") id added to or forgotten by this host.
Notify = Callable[[str, bool, str], None]


@dataclass(frozen=True)
class HostStatus:
    """The host record's changing part: GPU states, live sessions and active tasks (read at every sync tick)."""

    gpus: tuple[GpuState, ...]
    live_sessions: int = 0
    active_tasks: int = 0


@dataclass(frozen=True)
class LocalState:
    """Everything this host publishes: its status, and the ids of the sessions and tasks it answers for (a full
    snapshot, taken only when registering from scratch)."""

    status: HostStatus
    sessions: frozenset[str]
    tasks: frozenset[str]


class LocalSource:
    """This host's sessions and tasks as the registrar sees them: a full snapshot on demand, the status at each
    tick, and each id added or forgotten as it happens (through the registries' watchers)."""

    def __init__(
        self, sessions: SessionRegistry, tasks: TaskRegistry, gpus: Callable[[], tuple[GpuState, ...]]
    ) -> None:
        self._sessions = sessions
        self._tasks = tasks
        self._gpus = gpus
        self._notify: Notify | None = None
        # Not yet ended: a tick counts these and drops the ones that ended (few: bounded by GPUs and queues).
        self._live: dict[str, Session] = {}
        self._active: dict[str, Task] = {}

    def listen(self, notify: Notify) -> None:
        """Start telling `notify` of every id added and forgotten from now on."""
        self._notify = notify
        self._sessions.watch(self._session_seen)
        self._tasks.watch(self._task_seen)

    def _session_seen(self, added: bool, session: Session) -> None:
        self._seen("sessions", self._live, added, session, session.is_over)

    def _task_seen(self, added: bool, task: Task) -> None:
        self._seen("tasks", self._active, added, task, task.final)

    def _seen(self, kind: str, current: dict[str, Any], added: bool, item: Session | Task, ended: bool) -> None:
        """An id added to or forgotten by a registry: kept among the current ones while it has not ended, and told."""
        if added and not ended:
            current[item.id] = item
        elif not added:
            current.pop(item.id, None)
        if self._notify is not None:
            self._notify(kind, added, item.id)

    def status(self) -> HostStatus:
        """GPU states and the live counts, now: costs the GPUs and the live sessions and tasks only."""
        for over in [key for key, s in self._live.items() if s.is_over]:
            del self._live[over]
        for done in [key for key, t in self._active.items() if t.final]:
            del self._active[done]
        return HostStatus(self._gpus(), len(self._live), len(self._active))

    def snapshot(self) -> LocalState:
        """Every session and task still in memory (ended ones too, for a while: another host then forwards a
        request for one here, which answers as it would itself), and the status; scans them all."""
        sessions = self._sessions.all()
        tasks = self._tasks.all()
        self._live = {s.id: s for s in sessions if not s.is_over}
        self._active = {t.id: t for t in tasks if not t.final}
        return LocalState(self.status(), frozenset(s.id for s in sessions), frozenset(t.id for t in tasks))
