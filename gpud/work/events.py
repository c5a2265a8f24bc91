"""Task events: one ordered, bounded, replayable log per task, read by any number of subscribers.

Every subscriber holds a cursor (the last id it has seen) into the task's single list and sleeps on one shared
asyncio.Event while it is caught up. No per-subscriber queues: a slow client only lags its own cursor, never
blocks the task or other clients, and memory is the log itself.

Bounds (defaults on TaskEventLog): below `max_events` every append is its own event. From then on `text_delta`
appends are coalesced: buffered and published as one event when `coalesce_bytes` have gathered, after
`coalesce_interval` seconds, or before any other event; `logs` and `progress` appends are dropped (counted). Once
the log holds `max_bytes` of encoded data, `text_delta` is dropped too. Control events (connection, worker, text,
task_finish) are always kept, and `text` carries the complete output, so a client never loses the result. If
anything was dropped, a final `logs` line from stream "gpud" says how much, just before `task_finish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)


class EventType(enum.StrEnum):
    """The SSE `event:` names a task produces."""

    CONNECTION = "connection"
    WORKER = "worker"
    TEXT_DELTA = "text_delta"
    TEXT = "text"
    LOGS = "logs"
    PROGRESS = "progress"
    TASK_FINISH = "task_finish"


# Kinds that may be thinned out when a task is very chatty; everything else is always kept.
_DROPPABLE = frozenset({EventType.LOGS, EventType.PROGRESS})


class Event:
    """One event: id (1, 2, ... per task), type, and data (always with task_id). Treat data as read-only."""

    __slots__ = ("_json", "data", "frame_cache", "id", "type")

    def __init__(self, id: int, type: EventType, data: dict[str, Any]) -> None:
        self.id = id
        self.type = type
        self.data = data
        self._json: bytes | None = None
        # The transport's encoded form (gpud.api.sse puts the SSE frame here), so N subscribers encode once.
        self.frame_cache: bytes | None = None

    @property
    def json_bytes(self) -> bytes:
        """The data as compact UTF-8 JSON, encoded once and shared by every subscriber (never has a newline)."""
        if self._json is None:
            self._json = json.dumps(self.data, ensure_ascii=False, separators=(",", ":")).encode()
        return self._json

    @property
    def json(self) -> str:
        """The data as compact JSON text."""
        return self.json_bytes.decode()

    def __repr__(self) -> str:
        return f"Event(id={self.id}, type={self.type.value}, data={self.data!r})"


class TaskEventLog:
    """The events of one task, in order, with replay from any id and live waiting for new ones."""

    def __init__(
        self,
        task_id: str,
        *,
        max_events: int = 10_000,
        max_bytes: int = 32 * 1024 * 1024,
        coalesce_bytes: int = 16 * 1024,
        coalesce_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.task_id = task_id
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.coalesce_bytes = coalesce_bytes
        self.coalesce_interval = coalesce_interval
        self._clock = clock
        self._events: list[Event] = []
        self._bytes = 0
        self._finished = False
        self._wake: asyncio.Event | None = None  # created by the first waiter, set and dropped on each publish
        self._pending: list[str] = []  # coalesced text_delta not yet published
        self._pending_len = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._subscribers = 0
        self._last_left_at: float | None = None
        self.dropped = 0
        self.coalesced = 0

    @property
    def finished(self) -> bool:
        """True once task_finish was appended; no more events will come."""
        return self._finished

    @property
    def last_id(self) -> int:
        """The id of the newest published event (0 if none)."""
        return len(self._events)

    @property
    def subscribers(self) -> int:
        """How many subscribers are attached now."""
        return self._subscribers

    @property
    def last_left_at(self) -> float | None:
        """Clock time when the subscriber count last dropped to zero (None if never, or while attached)."""
        return self._last_left_at if self._subscribers == 0 else None

    def events(self, after_id: int = 0) -> list[Event]:
        """A copy of the published events with id > after_id."""
        return self._events[max(after_id, 0) :]

    def append(self, type: EventType, data: dict[str, Any]) -> Event | None:
        """Add an event; returns it, or None if it was coalesced (published later), dropped, or the log finished."""
        if type is EventType.TASK_FINISH:
            raise ValueError("task_finish ends the log: use finish()")
        if self._finished:
            logger.debug("task %s: %s after task_finish ignored", self.task_id, type.value)
            return None
        if len(self._events) >= self.max_events:
            if type is EventType.TEXT_DELTA:
                return self._coalesce(str(data.get("delta", "")))
            if type in _DROPPABLE:
                self.dropped += 1
                return None
        self._flush_pending()
        return self._publish(type, data)

    def finish(self, data: dict[str, Any]) -> Event:
        """Append task_finish (the last event) and wake every subscriber so it can end. Idempotent."""
        if self._finished:
            return self._events[-1]
        self._flush_pending()
        if self.dropped:
            line = f"{self.dropped} log/progress/text_delta events were dropped (event log limit)"
            self._publish(EventType.LOGS, {"stream": "gpud", "line": line})
        event = self._publish(EventType.TASK_FINISH, data)
        self._finished = True
        return event

    def _publish(self, type: EventType, data: dict[str, Any]) -> Event:
        event = Event(len(self._events) + 1, type, {**data, "task_id": self.task_id})
        self._bytes += len(event.json_bytes)
        self._events.append(event)
        if self._wake is not None:
            self._wake.set()
            self._wake = None
        return event

    def _coalesce(self, delta: str) -> Event | None:
        if self._bytes + self._pending_len + len(delta) > self.max_bytes:
            self.dropped += 1
            return None
        self.coalesced += 1
        self._pending.append(delta)
        self._pending_len += len(delta)
        if self._pending_len >= self.coalesce_bytes:
            return self._flush_pending()
        if self._flush_handle is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flushed by the next event or finish()
                loop = asyncio.get_running_loop()
                self._flush_handle = loop.call_later(self.coalesce_interval, self._flush_pending)
        return None

    def _flush_pending(self) -> Event | None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending or self._finished:
            return None
        delta = "".join(self._pending)
        self._pending.clear()
        self._pending_len = 0
        return self._publish(EventType.TEXT_DELTA, {"delta": delta})

    @contextlib.contextmanager
    def attach(self, after_id: int = 0) -> Iterator[Subscription]:
        """Count a subscriber for the duration of the block and give it a cursor after `after_id`."""
        self._subscribers += 1
        try:
            yield Subscription(self, after_id)
        finally:
            self._subscribers -= 1
            if self._subscribers == 0:
                self._last_left_at = self._clock()

    async def subscribe(self, after_id: int = 0) -> AsyncIterator[Event]:
        """Yield events with id > after_id: first the stored ones, then live ones; ends after task_finish."""
        with self.attach(after_id) as sub:
            while True:
                batch = sub.take()
                if not batch:
                    if sub.exhausted:
                        return
                    await sub.wait()
                for event in batch:
                    yield event

    async def _wait_after(self, last_id: int) -> None:
        while not self._finished and last_id >= len(self._events):
            if self._wake is None:
                self._wake = asyncio.Event()
            await self._wake.wait()


class Subscription:
    """A cursor into a TaskEventLog: take() what is there, wait() for more. Made by TaskEventLog.attach()."""

    __slots__ = ("_log", "last_id")

    def __init__(self, log: TaskEventLog, after_id: int) -> None:
        self._log = log
        self.last_id = max(after_id, 0)

    def take(self, limit: int = 512) -> list[Event]:
        """The next events after the cursor (at most `limit`), without waiting; moves the cursor past them."""
        batch = self._log._events[self.last_id : self.last_id + limit]
        if batch:
            self.last_id = batch[-1].id
        return batch

    @property
    def exhausted(self) -> bool:
        """True when the log is finished and the cursor has passed its last event."""
        return self._log.finished and self.last_id >= self._log.last_id

    async def wait(self) -> None:
        """Return when there are events after the cursor or the log has finished."""
        await self._log._wait_after(self.last_id)
