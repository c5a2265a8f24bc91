"""What the host side of the worker protocol hands its callers: errors, the ready info, task events, and the
stream a sent task's events go to (gpud/worker/channel.py produces them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class WorkerError(Exception):
    """Base of every failure the channel reports."""


class WorkerGone(WorkerError):
    """The worker's connection closed (it exited, crashed, or was killed)."""


class WorkerTimeout(WorkerError, TimeoutError):
    """The worker did not answer in time."""


class WorkerBusy(WorkerError):
    """A task is already running on this worker (one at a time)."""


class WorkerSetupFailed(WorkerError):
    """The worker reported an error before it became ready (its load step failed)."""


@dataclass(frozen=True, slots=True)
class ReadyInfo:
    """What the worker said when it became ready."""

    protocol: int
    pid: int | None
    info: dict[str, Any]
    seconds_to_ready: float  # from start() to `ready`, measured by gpud
    # A worker that kept its loaded model across gpud's restart and reconnected: `hello {resuming: true}` and
    # `ready {resumed: true}`, whose info is the one it gave at its first ready (no load happened now).
    resumed: bool = False


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs several times more, once per message
class WorkerEvent:
    """One task message from the worker: type is a WorkerMessage value, data is the message minus `type`."""

    type: str
    task_id: str
    data: dict[str, Any] = field(default_factory=dict)


# Where a running task's events go, as they arrive: each WorkerEvent (the last is `done`), or one WorkerError.
EventSink = Callable[[WorkerEvent | WorkerError], None]


@dataclass(slots=True)
class TaskStream:
    """A task sent to the worker: its events go to `sink` until `done` or until the caller abandons it."""

    task_id: str
    delta_prefix: bytes  # protocol.delta_prefix(task_id)
    sink: EventSink
    abandoned: bool = False  # the caller stopped listening; drop events until `done`

    def deliver(self, item: WorkerEvent | WorkerError) -> None:
        """Hand one event (or the error that ends the task) to the caller, unless it stopped listening."""
        if not self.abandoned:
            self.sink(item)
