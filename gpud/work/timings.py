"""Where one task's time went: the phases its runner records as they end, reported on the task and in task_finish."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# The names a report carries, in order (GET /api/tasks/{id} and task_finish: `timings`).
FIELDS = ("queue_wait_seconds", "model_fetch_seconds", "worker_start_seconds", "first_output_seconds", "run_seconds")


def since(started: float) -> float:
    """Seconds since a time.monotonic() reading."""
    return time.monotonic() - started


@dataclass
class TaskTimings:
    """A task's phases. The runner sets the durations it measured; None means the phase did not happen for this
    task (a task on a warm session fetches no model and starts no worker).

    - model_fetch_seconds: waiting for the model to be in the cache (about 0 when it already was);
    - worker_start_seconds: from the model being there until the worker can take the task (image, container,
      and for a session the model load);
    - first_output_at: when the first text or text_delta came (epoch seconds, like the task's other times).
    Queue wait (submission to running) and run time (running to the end) come from the task's own times."""

    model_fetch_seconds: float | None = None
    worker_start_seconds: float | None = None
    first_output_at: float | None = None

    def report(self, created_at: float, started_at: float | None, finished_at: float | None) -> dict[str, Any]:
        """The phases in seconds, rounded to milliseconds; the run so far while the task runs."""
        end = finished_at or time.time()
        values = (
            None if started_at is None else started_at - created_at,
            self.model_fetch_seconds,
            self.worker_start_seconds,
            None if self.first_output_at is None else self.first_output_at - created_at,
            None if started_at is None else end - started_at,
        )
        return {
            name: None if value is None else round(max(0.0, value), 3)
            for name, value in zip(FIELDS, values, strict=True)
        }

    @classmethod
    def from_report(cls, report: object, created_at: float) -> TaskTimings:
        """The timings a stored report describes (a task read back from the records); nothing when unreadable."""
        if not isinstance(report, dict):
            return cls()
        first = _number(report.get("first_output_seconds"))
        return cls(
            model_fetch_seconds=_number(report.get("model_fetch_seconds")),
            worker_start_seconds=_number(report.get("worker_start_seconds")),
            first_output_at=None if first is None else created_at + first,
        )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
