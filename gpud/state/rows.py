"""The rows gpud keeps about its work: one per task, one per session (plain values; gpud.work fills them)."""

from __future__ import annotations

from dataclasses import dataclass

# Final task statuses and ended session states, as gpud.work spells them: rows in these are "closed".
FINAL_TASK_STATUSES = ("completed", "failed", "timeout", "cancelled")
ENDED_SESSION_STATES = ("stopped", "failed")


@dataclass(frozen=True)
class TaskRow:
    """What survives of a task: identity, where it ran, status and times, and how it ended.

    `tail` holds the task's last events as JSON (`[[id, type, data], ...]`, contiguous ids ending with
    task_finish), so that its stream can be replayed with the ids it had."""

    id: str
    task_type: str
    difficulty: str
    model_id: str
    preset: str
    timeout_seconds: float
    status: str
    created_at: float
    session_id: str | None = None
    gpu_id: int | None = None
    container_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    result: str | None = None  # JSON
    tail: bytes | None = None  # JSON, see above

    @property
    def final(self) -> bool:
        """Whether the task had ended when the row was written."""
        return self.status in FINAL_TASK_STATUSES


@dataclass(frozen=True)
class SessionRow:
    """What survives of a session: identity, GPU, state, times (epoch seconds) and counters."""

    id: str
    model_id: str
    preset: str
    difficulty: str
    gpu_index: int
    gpu_uuid: str
    state: str
    created_at: float
    last_active: float
    container_id: str | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    tasks_run: int = 0
    restarts: int = 0
    ready_info: str | None = None  # JSON

    @property
    def ended(self) -> bool:
        """Whether the session had ended when the row was written."""
        return self.state in ENDED_SESSION_STATES
