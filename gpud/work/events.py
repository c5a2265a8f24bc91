"""Task events: one ordered, bounded, replayable log per task, read by any number of subscribers.

Every subscriber holds a cursor (the last id it has seen) into the task's single list and sleeps on one shared
asyncio.Event while it is caught up. No per-subscriber queues: a slow client only lags its own cursor, never
blocks the task or other clients, and memory is the log itself.

Bounds (EventLimits), all counted from the first event:
- text: the task's output (`output`, a TextBuffer) keeps at most `output_bytes`; text_delta events carry what
  was kept, split into pieces of at most `delta_bytes`; the final `text` event carries the kept output.
- logs and progress share `logs_bytes` of encoded events; one log line is cut at `log_line_bytes` with a marker.
- count: below `max_events` every append is its own event. From then on text_delta pieces are coalesced (one
  event per `coalesce_bytes`, per `coalesce_interval`, or before any other event) and logs/progress are dropped.
Control events (connection, worker, text, task_finish) are always kept. If anything was cut or dropped, one
`logs` line from stream "gpud" says what and how much, just before task_finish.

Event data is encoded when the event is made, by gpud.jsonsafe: NaN becomes null and a lone surrogate U+FFFD,
so encoding never raises later (e.g. deep inside a task's finish). Only the encoded JSON is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from json.encoder import encode_basestring
from typing import Any

from gpud.jsonsafe import clean_text, dumps_safe
from gpud.work.event import Event, EventLimits, EventType, MiB
from gpud.work.textcap import TextBuffer, split_utf8, truncate_line

logger = logging.getLogger(__name__)


class TaskEventLog:
    """The events of one task, in order, with replay from any id and live waiting for new ones."""

    def __init__(
        self,
        task_id: str,
        *,
        limits: EventLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        first_id: int = 1,
        **overrides: Any,
    ) -> None:
        self.task_id = task_id
        self.limits = (
            dataclasses.replace(limits or EventLimits(), **overrides) if overrides else limits or EventLimits()
        )
        self.output = TextBuffer(self.limits.output_bytes)
        self._clock = clock
        self._events: list[Event] = []
        # Ids before the first stored event: released ones (see release()), or, for a log made again after a
        # restart, every id issued before it (first_id above them), so a client's Last-Event-ID still works.
        self._base = first_id - 1
        self._origin = self._base  # events are counted (max_events) from here
        self._bytes = 0  # encoded bytes of the stored events
        self._logs_bytes = 0
        self._finished = False
        self._wake: asyncio.Event | None = None  # created by the first waiter, set and dropped on each publish
        self._pending: list[str] = []  # coalesced text_delta pieces not yet published
        self._pending_len = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._delta_tail: bytes | None = None  # `,"task_id":"…"}`, the end of every text_delta's JSON
        self._subscribers = 0
        self._last_left_at: float | None = None
        self.dropped = 0  # logs/progress dropped past max_events
        self.coalesced = 0
        self.logs_cut = 0  # logs/progress events over logs_bytes, and their bytes
        self.logs_cut_bytes = 0
        self.lines_shortened = 0  # log lines over log_line_bytes, and the bytes cut from them
        self.line_bytes_cut = 0

    @classmethod
    def replay_of(cls, task_id: str, first_id: int, events: Iterable[tuple[EventType, bytes]]) -> TaskEventLog:
        """A finished log holding only `events` (encoded data), with ids from `first_id` on: a finished task's
        stored ending (its `text` and `task_finish`), replayed after a restart with the ids it had."""
        log = cls(task_id, first_id=first_id)
        for type, data in events:
            log._publish_encoded(type, data)
        log._finished = True
        return log

    @property
    def finished(self) -> bool:
        """True once task_finish was appended; no more events will come."""
        return self._finished

    @property
    def last_id(self) -> int:
        """The id of the newest published event (0 if none)."""
        return self._base + len(self._events)

    @property
    def retained_bytes(self) -> int:
        """What this log holds: its encoded events and the task's output."""
        return self._bytes + self.output.size

    @property
    def subscribers(self) -> int:
        """How many subscribers are attached now."""
        return self._subscribers

    @property
    def last_left_at(self) -> float | None:
        """Clock time when the subscriber count last dropped to zero (None if never, or while attached)."""
        return self._last_left_at if self._subscribers == 0 else None

    def events(self, after_id: int = 0) -> list[Event]:
        """A copy of the stored events with id > after_id."""
        return self._events[max(after_id - self._base, 0) :]

    def _slice(self, after_id: int, limit: int, max_bytes: int | None) -> list[Event]:
        start = max(after_id - self._base, 0)
        batch = self._events[start : start + limit]
        if max_bytes is not None:
            size = 0
            for n, event in enumerate(batch):
                size += len(event.json_bytes)
                if size >= max_bytes:
                    return batch[: n + 1]
        return batch

    def append(self, type: EventType, data: dict[str, Any]) -> Event | None:
        """Add an event; returns it, or None if it was coalesced (published later), dropped, or the log finished."""
        if type is EventType.TASK_FINISH:
            raise ValueError("task_finish ends the log: use finish()")
        if self._finished:
            logger.debug("task %s: %s after task_finish ignored", self.task_id, type.value)
            return None
        if type is EventType.TEXT_DELTA:
            return self.append_delta(str(data.get("delta", "")))
        if type is EventType.LOGS:
            line, cut = truncate_line(clean_text(str(data.get("line", ""))), self.limits.log_line_bytes)
            return self._append_droppable(type, {**data, "line": line}, cut)
        if type is EventType.PROGRESS:
            return self._append_droppable(type, data, 0)
        self._flush_pending()
        return self._publish(type, data)

    def append_delta(self, text: str) -> Event | None:
        """append(TEXT_DELTA, {"delta": text}), without the dict: the one event a streaming worker sends."""
        if self._finished:
            return None
        last = None
        kept = self.output.append(clean_text(text))
        if not kept:
            return None
        # One piece when it is short (4 bytes a character at most): no generator per delta.
        for piece in (kept,) if len(kept) * 4 <= self.limits.delta_bytes else split_utf8(kept, self.limits.delta_bytes):
            if self.last_id - self._origin >= self.limits.max_events:
                last = self._coalesce(piece)
            else:
                self._flush_pending()
                last = self._publish_delta(piece)
        return last

    def append_line(self, stream: str, line: str, dropped: int = 0) -> Event | None:
        """A `logs` line of which `dropped` bytes were already left out (a runtime's over-long line)."""
        if self._finished:
            return None
        text, cut = truncate_line(clean_text(line), self.limits.log_line_bytes, dropped)
        return self._append_droppable(EventType.LOGS, {"stream": stream, "line": text}, cut)

    def _append_droppable(self, type: EventType, data: dict[str, Any], cut: int) -> Event | None:
        """A logs or progress event within the event count and the logs budget; `cut` bytes were cut from its line."""
        if self.last_id - self._origin >= self.limits.max_events:
            self.dropped += 1
            return None
        encoded = dumps_safe({**data, "task_id": self.task_id})
        if self._logs_bytes + len(encoded) > self.limits.logs_bytes:
            self.logs_cut += 1
            self.logs_cut_bytes += len(encoded)
            return None
        self._logs_bytes += len(encoded)
        if cut:
            self.lines_shortened += 1
            self.line_bytes_cut += cut
        self._flush_pending()
        return self._publish_encoded(type, encoded)

    def append_text(self) -> Event | None:
        """The `text` event: the whole kept output. Encoded piece by piece from the buffer, so the output is never
        held joined (16 MiB of text costs 16 MiB more here, not 48)."""
        if self._finished:
            return None
        self._flush_pending()
        parts = [b'{"text":"']
        for piece in self.output.pieces():
            parts.append(json.dumps(clean_text(piece), ensure_ascii=False)[1:-1].encode())
        parts.append(b'","task_id":%s}' % json.dumps(self.task_id).encode())
        return self._publish_encoded(EventType.TEXT, b"".join(parts))

    def finish(self, data: dict[str, Any]) -> Event:
        """Append task_finish (the last event) and wake every subscriber so it can end. Idempotent."""
        if self._finished:
            return self._events[-1]
        self._flush_pending()
        notice = self.cut_notice()
        if notice:
            self._publish(EventType.LOGS, {"stream": "gpud", "line": notice})
        event = self._publish(EventType.TASK_FINISH, data)
        self._finished = True
        return event

    def cut_notice(self) -> str | None:
        """One line saying what the bounds cut or dropped, and how much; None when nothing was."""
        parts = []
        limits = self.limits
        if self.output.cut:
            parts.append(f"text output over the {_size(limits.output_bytes)} limit: {self.output.cut} bytes cut")
        if self.logs_cut:
            parts.append(
                f"{self.logs_cut} log/progress events over the {_size(limits.logs_bytes)} log limit dropped"
                f" ({self.logs_cut_bytes} bytes)"
            )
        if self.lines_shortened:
            parts.append(
                f"{self.lines_shortened} log lines longer than {_size(limits.log_line_bytes)} shortened"
                f" ({self.line_bytes_cut} bytes cut)"
            )
        if self.dropped:
            parts.append(f"{self.dropped} log/progress events dropped past {limits.max_events} events")
        return "gpud cut this task's output: " + "; ".join(parts) if parts else None

    def release(self) -> int:
        """Free a finished log's stored events (all but task_finish) and output; returns the bytes freed."""
        if not self._finished or len(self._events) <= 1:
            return 0
        freed = self.retained_bytes
        last = self._events[-1]
        self._base += len(self._events) - 1
        self._events = [last]
        self._bytes = len(last.json_bytes)
        self.output.replace("")
        return freed - self.retained_bytes

    def _publish(self, type: EventType, data: dict[str, Any]) -> Event:
        return self._publish_encoded(type, dumps_safe({**data, "task_id": self.task_id}))

    def _publish_delta(self, piece: str) -> Event:
        """A text_delta of `piece` (clean text): the same JSON as _publish makes, without a dict per delta."""
        if self._delta_tail is None:
            self._delta_tail = b',"task_id":%s}' % dumps_safe(self.task_id)
        encoded = b'{"delta":%s%s' % (encode_basestring(piece).encode(), self._delta_tail)  # as dumps_safe writes it
        return self._publish_encoded(EventType.TEXT_DELTA, encoded)

    def _publish_encoded(self, type: EventType, encoded: bytes) -> Event:
        event = Event(self.last_id + 1, type, encoded)
        self._bytes += len(encoded)
        self._events.append(event)
        if self._wake is not None:
            self._wake.set()
            self._wake = None
        return event

    def _coalesce(self, piece: str) -> Event | None:
        self.coalesced += 1
        self._pending.append(piece)
        self._pending_len += len(piece)
        if self._pending_len >= self.limits.coalesce_bytes:
            return self._flush_pending()
        if self._flush_handle is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flushed by the next event or finish()
                loop = asyncio.get_running_loop()
                self._flush_handle = loop.call_later(self.limits.coalesce_interval, self._flush_pending)
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
        return self._publish_delta(delta)

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
        while not self._finished and last_id >= self.last_id:
            if self._wake is None:
                self._wake = asyncio.Event()
            await self._wake.wait()


def _size(n: int) -> str:
    """A byte count in words: 16 MiB, 16 KiB, 100 bytes."""
    for unit, name in ((MiB, "MiB"), (1024, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


class Subscription:
    """A cursor into a TaskEventLog: take() what is there, wait() for more. Made by TaskEventLog.attach()."""

    __slots__ = ("_log", "last_id")

    def __init__(self, log: TaskEventLog, after_id: int) -> None:
        self._log = log
        self.last_id = max(after_id, 0)

    def take(self, limit: int = 512, max_bytes: int | None = None) -> list[Event]:
        """The next events after the cursor (at most `limit`, and past `max_bytes` of JSON only by the last one),
        without waiting; moves the cursor past them."""
        batch = self._log._slice(self.last_id, limit, max_bytes)
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
