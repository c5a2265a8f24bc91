"""One task event (`Event`), the event names (`EventType`) and the bounds of a task's log (`EventLimits`); the log
itself is gpud/work/events.py, which these are imported from."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from gpud.jsonsafe import dumps_safe

MiB = 1024 * 1024


class EventType(enum.StrEnum):
    """The SSE `event:` names a task produces."""

    CONNECTION = "connection"
    WORKER = "worker"
    TEXT_DELTA = "text_delta"
    TEXT = "text"
    LOGS = "logs"
    PROGRESS = "progress"
    TASK_FINISH = "task_finish"


@dataclass(frozen=True)
class EventLimits:
    """The bounds of one task's log (sizes in bytes)."""

    max_events: int = 10_000
    output_bytes: int = 16 * MiB  # the task's text output (UTF-8)
    logs_bytes: int = 4 * MiB  # logs and progress events together (encoded)
    log_line_bytes: int = 16 * 1024  # one log line (UTF-8); longer lines are cut with a marker
    delta_bytes: int = 64 * 1024  # one text_delta event's text (UTF-8); longer text is split, not cut
    coalesce_bytes: int = 16 * 1024
    coalesce_interval: float = 0.25


class Event:
    """One event: id (1, 2, ... per task), type, and its data as JSON (always with task_id)."""

    __slots__ = ("id", "json_bytes", "type")

    def __init__(self, id: int, type: EventType, data: dict[str, Any] | bytes) -> None:
        self.id = id
        self.type = type
        # Compact UTF-8 JSON, encoded once and shared by every subscriber (it never holds a raw newline).
        self.json_bytes: bytes = data if isinstance(data, bytes) else dumps_safe(data)

    @property
    def data(self) -> dict[str, Any]:
        """The data, decoded from the stored JSON (a fresh dict each time)."""
        value: dict[str, Any] = json.loads(self.json_bytes)
        return value

    @property
    def json(self) -> str:
        """The data as compact JSON text."""
        return self.json_bytes.decode()

    def __repr__(self) -> str:
        return f"Event(id={self.id}, type={self.type.value}, data={self.json})"
