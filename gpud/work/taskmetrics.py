"""What tasks tell the daemon's metrics as they go: queue wait when one runs, time to first output, how it ended."""

from __future__ import annotations

from gpud.metrics import Metrics, child
from gpud.work.request import TaskType
from gpud.work.task import Task, TaskStatus

# Exit codes above this are a signal's (128 + N, as the engines and the process runtime report them).
SIGNAL_EXIT_BASE = 128


class TaskMetrics:
    """The task registry's observers: each records one moment of a task in the metrics (labels: type, status)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def running(self, task: Task) -> None:
        """The task started on a worker: its queue wait (submission to now) is known."""
        if task.started_at is not None:
            wait = max(0.0, task.started_at - task.created_at)
            child(self._metrics.task_queue_wait, task.request.task_type.value).observe(wait)

    def first_output(self, task: Task) -> None:
        """The task's first text came."""
        if task.timings.first_output_at is not None:
            seconds = max(0.0, task.timings.first_output_at - task.created_at)
            child(self._metrics.task_first_output, task.request.task_type.value).observe(seconds)

    def finished(self, task: Task) -> None:
        """The task ended: its outcome, its duration, and whether its one-off worker crashed."""
        labels = (task.request.task_type.value, task.status.value)
        child(self._metrics.tasks_finished, *labels).inc()
        child(self._metrics.task_duration, *labels).observe(task.elapsed())
        if task.request.task_type is TaskType.ONEOFF and oneoff_crashed(task):
            # A session worker's crash is counted by its session (once, however many tasks it fails).
            self._metrics.worker_crashes.labels(TaskType.ONEOFF.value).inc()

    def client_gone(self) -> None:
        """A task was cancelled because its clients left."""
        self._metrics.client_gone_cancels.inc()


def oneoff_crashed(task: Task) -> bool:
    """Whether a one-off's worker died rather than exited: killed for memory, or by a signal."""
    if task.status is not TaskStatus.FAILED or task.error is None:
        return False
    if task.error.code == "out_of_memory":
        return True
    return task.error.code == "worker_failed" and (task.exit_code or 0) > SIGNAL_EXIT_BASE
