"""Re-attaching a one-off whose container survived gpud's restart (or exited meanwhile): its task is rebuilt from
its record (or its labels), its GPU leased again while it runs, its output read again from the container's start
into a new log, and its outcome recorded by the one-off runner as for any other run."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from gpud.errors import Conflict, NotFound
from gpud.gpu.scheduler import Lease
from gpud.runtime.base import LABEL_GPU, LABEL_MODEL, LABEL_PRESET, LABEL_TASK, ContainerInfo, ContainerState
from gpud.settings.presets import Preset
from gpud.state import RecordsError, TaskRow
from gpud.work.events import EventType, TaskEventLog
from gpud.work.hostparts import HostParts
from gpud.work.journal import Journal, restart_event_id
from gpud.work.request import TaskRequest, TaskType
from gpud.work.service import TaskService
from gpud.work.sessions.adopt import gpu_by_uuid, worker_user
from gpud.work.task import Task, TaskStatus
from gpud.work.uids import WorkerUser

logger = logging.getLogger(__name__)


@dataclass
class Resume:
    """A one-off ready to be followed again: its task, its GPU lease (None once exited), its user, time left."""

    task: Task
    lease: Lease | None
    user: WorkerUser
    timeout_left: float


class OneOffReattacher:
    """Prepares one-off containers for OneOffRunner.resume(); `open_tasks` are the unfinished tasks the records
    knew (each taken out once its container is found)."""

    def __init__(self, host: HostParts, journal: Journal, tasks: TaskService, open_tasks: dict[str, Task]) -> None:
        self._host = host
        self._journal = journal
        self._tasks = tasks
        self._open_tasks = open_tasks

    def prepare(self, info: ContainerInfo) -> Resume | str:
        """Lease (if it still runs), reserve and hold what a one-off's container needs; a string says why not."""
        labels = dict(info.labels)
        task_id = labels.get(LABEL_TASK, "")
        task = self._open_tasks.get(task_id) or self._task_from_labels(info)
        if task is None:
            return "its task had already ended (its removal must have failed then)"
        gpu = gpu_by_uuid(self._host.inventory, labels.get(LABEL_GPU))
        lease = None
        if info.state is ContainerState.RUNNING:
            if gpu is None:
                return f"its GPU {labels.get(LABEL_GPU)!r} is not one this gpud manages"
            try:
                lease = self._host.scheduler.adopt(gpu.index, task_id, "task", task.request.model_id)
            except Conflict as exc:
                return f"a duplicate: {exc.message}"
        user = worker_user(self._host.ids, task.preset, labels, task_id)
        if user is None:
            if lease is not None:
                self._host.scheduler.release(lease)
            return "its uid is missing or already another adopted worker's"
        with contextlib.suppress(NotFound):  # a model removed meanwhile: its mount keeps the files
            self._host.store.acquire(task.request.model_id, task_id)
        self._open_tasks.pop(task_id, None)
        task.container_id, task.gpu_id = info.id, gpu.index if gpu else task.gpu_id
        if task.status is TaskStatus.QUEUED:
            task.mark_running()
            task.started_at = info.created or task.started_at
        task.started_at = task.started_at or info.created
        state = "still running" if lease is not None else "exited meanwhile"
        task.emit(
            EventType.LOGS, stream="gpud",
            line=f"gpud restarted; its container {state}: the task's output is read again from its start",
        )  # fmt: skip
        left = task.request.timeout_seconds - (time.time() - task.started_at)
        logger.info("task %s: re-attached to its container %s (%s)", task_id, info.id[:12], state)
        return Resume(task, lease, user, max(left, 0.001))

    def _task_from_labels(self, info: ContainerInfo) -> Task | None:
        """A task for a one-off container the records do not know as unfinished; None if they know it ended."""
        labels = info.labels
        task_id = labels.get(LABEL_TASK, "")
        row = self._read_task(task_id)
        if row is not None and row.final:
            return None
        gpu = gpu_by_uuid(self._host.inventory, labels.get(LABEL_GPU))
        model, preset = labels.get(LABEL_MODEL, ""), labels.get(LABEL_PRESET, "")
        request = TaskRequest(
            TaskType.ONEOFF,
            gpu.difficulty if gpu else "low",
            model,
            preset,
            self._host.config.settings.default_task_timeout,
        )
        task = Task(request=request, preset=self.preset(model, preset), id=task_id, created_at=info.created)
        fresh_log(task, self._tasks)
        self._tasks.registry.add(task)
        logger.warning(
            "task %s: no record of it; re-attaching its container %s from its labels (timeout: the default %gs)",
            task_id, info.id[:12], request.timeout_seconds,
        )  # fmt: skip
        return task

    def _read_task(self, task_id: str) -> TaskRow | None:
        if self._journal.db is None:
            return None
        try:
            return self._journal.db.task(task_id)
        except RecordsError:
            return None

    def preset(self, model_id: str, name: str) -> Preset:
        """The catalog's preset, or a stand-in naming it (the catalog no longer has it)."""
        try:
            return self._host.config.presets.get(model_id, name)
        except NotFound:
            return Preset(model_id=model_id, name=name, image="")


def fresh_log(task: Task, tasks: TaskService) -> None:
    """Give a task brought back after a restart a new log whose ids are above any issued before."""
    task.limits = tasks.event_limits()
    task.log = TaskEventLog(task.id, limits=task.limits, first_id=restart_event_id())
