"""What one-off runs and session workers share when they launch a container: the GPU device, progress reports
into the task's stream, the stop grace, the tail of output quoted in errors, and the timeout error."""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection

from gpud.gpu.scheduler import Lease
from gpud.modelstore import FetchProgress
from gpud.runtime.base import GpuDevice
from gpud.work.event import EventType
from gpud.work.task import Task, TaskError

# How long a stopped worker gets between SIGTERM and SIGKILL.
STOP_GRACE_SECONDS = 5.0
# How many output lines a failed task's error quotes (the last ones).
ERROR_TAIL_LINES = 20
TAIL_LINE_CHARS = 1000


def gpu_device(lease: Lease) -> GpuDevice:
    """The runtime's view of a leased GPU: attach a device only for a real (NVML) GPU."""
    return GpuDevice(gpu_id=str(lease.gpu.index), uuid=lease.gpu.uuid, attach=lease.gpu.real)


def model_progress(task: Task) -> Callable[[FetchProgress], None]:
    """A model-store progress callback that reports into the task's stream."""

    def report(update: FetchProgress) -> None:
        task.emit(EventType.WORKER, status="fetching_model", **update.to_dict())

    return report


def image_progress(task: Task) -> Callable[[str], None]:
    """An image-pull progress callback that reports into the task's stream."""

    def report(message: str) -> None:
        task.emit(EventType.WORKER, status="pulling_image", image=task.preset.image, message=message)

    return report


def log_tail() -> collections.deque[str]:
    """A buffer of the last ERROR_TAIL_LINES lines of a worker's output, quoted when it fails."""
    return collections.deque(maxlen=ERROR_TAIL_LINES)


def quote_tail(lines: Collection[str]) -> str:
    """`; last log lines:` and the lines, for an error message; nothing when there were none."""
    # Each line is cut: a worker's 4 MiB log line must not become a 4 MiB error message (or gpud log line).
    return "; last log lines:\n" + "\n".join(line[:TAIL_LINE_CHARS] for line in lines) if lines else ""


def timeout_error(task: Task, suffix: str = "") -> TaskError:
    """The error of a task that ran past its timeout."""
    return TaskError("timeout", f"task ran past its timeout of {task.request.timeout_seconds:g}s{suffix}")
