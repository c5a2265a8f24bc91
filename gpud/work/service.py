"""Task submission: every check that can fail before work starts, then hand-off to a one-off run or a session."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from gpud.errors import Conflict, GpudError, InvalidRequest, NotFound
from gpud.gpu.scheduler import Lease, Scheduler
from gpud.metrics import Metrics
from gpud.modelstore import ModelStore
from gpud.runtime.base import ContainerRuntime, EngineUnavailable
from gpud.runtime.instance import health_for_new_work
from gpud.settings import LiveConfig
from gpud.work.capacity import Capacity
from gpud.work.event import EventLimits
from gpud.work.journal import Journal
from gpud.work.oneoff import OneOffRunner
from gpud.work.registry import TaskRegistry
from gpud.work.removals import PendingRemovals
from gpud.work.request import TaskRequest, TaskType
from gpud.work.sessions.manager import SessionManager
from gpud.work.task import Task, new_id
from gpud.work.taskmetrics import TaskMetrics

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
# How often the janitor looks for abandoned tasks and expired records.
JANITOR_INTERVAL_SECONDS = 1.0
# How long a stopping gpud keeps trying to remove containers the engine would not remove before.
SHUTDOWN_REMOVAL_SECONDS = 10.0


class TaskService:
    """Accepts tasks and keeps them until their retention ends; owns the one-off runs it starts."""

    def __init__(
        self,
        config: LiveConfig,
        runtime: ContainerRuntime,
        store: ModelStore,
        scheduler: Scheduler,
        oneoff: OneOffRunner,
        sessions: SessionManager,
        metrics: Metrics,
        journal: Journal | None = None,
        removals: PendingRemovals | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        self._config = config
        self._runtime = runtime
        self._store = store
        self._scheduler = scheduler
        self._oneoff = oneoff
        self.sessions = sessions
        self._metrics = metrics
        # Leases for new work: a free GPU, or an idle session's, ended for it (GPUD_SESSION_EVICT_IDLE).
        self._capacity = capacity or Capacity(scheduler, sessions, config, metrics)
        self._observe = TaskMetrics(metrics)
        self.registry = TaskRegistry(
            lambda: config.settings.task_retention_seconds,
            on_finish=self._observe.finished,
            retention_bytes=lambda: config.settings.task_retention_max_bytes,
            records=journal,
            on_running=self._observe.running,
            on_first_output=self._observe.first_output,
        )
        self.journal = journal
        # Containers the engine would not remove (it did not answer): the janitor tries them again.
        self.removals = removals or PendingRemovals(runtime)
        self._runs: set[asyncio.Task[None]] = set()

    async def submit(self, request: TaskRequest) -> Task:
        """Validate against the host's state and start the task; raises the error a client should see."""
        if request.session_id is not None:
            return self._submit_to_session(request)
        settings = self._config.settings
        preset = self._config.presets.get(request.model_id, request.preset)
        expected = "oneoff" if request.task_type is TaskType.ONEOFF else "session"
        if preset.mode not in ("any", expected):
            raise InvalidRequest(f"preset {preset.key} runs as {preset.mode}, not {expected}", code="invalid_task_type")
        settings.allowed_docker_images.check(preset.image)
        self._check_model(request.model_id)
        # The engine state the daemon's probe and the engine calls keep, checked cheaply (no round trip per submit).
        health = await health_for_new_work(self._runtime)
        if not health.ok:
            raise EngineUnavailable(f"the {health.runtime} engine is not reachable: {health.detail}", retry_after=5.0)
        task = Task(request=request, preset=preset, limits=self.event_limits())
        if request.task_type is TaskType.ONEOFF:
            lease = await self._oneoff_lease(task)
            user = self._or_release(lease, lambda: self._oneoff.admit(task))
            self._spawn(self._oneoff.run(task, lease, user), task)
        else:
            lease = await self._capacity.acquire(request.difficulty, new_id(), "session", request.model_id)
            self._or_release(lease, lambda: self.sessions.open(task, lease))
        self.registry.add(task)
        return task

    async def _oneoff_lease(self, task: Task) -> Lease | None:
        """The GPU, leased now when the model is cached. Otherwise None, once a free GPU (or an idle session's) is
        seen (a 503 now if none is): the run leases it after the fetch, so a slow file service holds no GPU
        (docs/model-store.md)."""
        difficulty = task.request.difficulty
        if not self._store.cached(task.request.model_id):
            self._capacity.check(difficulty)
            return None
        lease = await self._capacity.acquire(difficulty, task.id, "task", task.request.model_id)
        task.gpu_id = lease.gpu.index
        return lease

    def _or_release(self, lease: Lease | None, step: Callable[[], _T]) -> _T:
        """Run a step after the GPU lease; if it fails (e.g. no worker uid free), the GPU goes back first."""
        try:
            return step()
        except GpudError:
            if lease is not None:
                self._scheduler.release(lease)
            raise

    def _submit_to_session(self, request: TaskRequest) -> Task:
        assert request.session_id is not None
        session = self.sessions.registry.get(request.session_id)
        if (request.model_id, request.preset) != (session.preset.model_id, session.preset.name):
            raise Conflict(
                f"session {session.id} runs {session.preset.key}, not {request.model_id}/{request.preset}",
                code="session_model_mismatch",
            )
        task = Task(request=request, preset=session.preset, limits=self.event_limits())
        self.sessions.enqueue(session, task)
        self.registry.add(task)
        return task

    def event_limits(self) -> EventLimits:
        """The bounds a new task's events and output get, from the settings now."""
        settings = self._config.settings
        return EventLimits(
            output_bytes=settings.task_output_max_bytes,
            logs_bytes=settings.task_logs_max_bytes,
            log_line_bytes=settings.log_line_max_bytes,
            delta_bytes=settings.text_delta_max_bytes,
        )

    def _check_model(self, model_id: str) -> None:
        """Bad ids are 400; a model that is absent with auto-fetch off is 404 before any GPU is leased."""
        path = self._store.path_for(model_id)
        if not self._config.settings.auto_fetch_models and not path.is_dir():
            raise NotFound(
                f"model {model_id!r} is not in the cache and AUTO_FETCH_MODELS is off", code="model_not_cached"
            )

    def spawn(self, coro: Any, task: Task) -> None:
        """Run a task's coroutine (a one-off re-attached after a restart) as one of this service's runs."""
        self._spawn(coro, task)

    def _spawn(self, coro: Any, task: Task) -> None:
        run = asyncio.create_task(coro, name=f"task-{task.id}")
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)

    async def cancel(self, task_id: str) -> Task:
        """Cancel a queued or running task; Conflict when it has already ended."""
        task = self.registry.get(task_id)
        if not await task.cancel("cancelled"):
            raise Conflict(f"task {task_id} has already ended ({task.status.value})", code="task_finished")
        return task

    def counts(self) -> dict[str, int]:
        """Active tasks and live sessions, for /health."""
        return {"active_tasks": len(self.registry.active()), "active_sessions": len(self.sessions.registry.live())}

    async def janitor(self) -> None:
        """Forever: cancel tasks whose clients are all gone past the grace period; forget old records."""
        while True:
            await asyncio.sleep(JANITOR_INTERVAL_SECONDS)
            settings = self._config.settings
            now = time.monotonic()
            for task in self.registry.active():
                left = task.log.last_left_at
                # Once asked, a task is left to its runner (which ends it by its timeout at the latest): asking
                # again every second would only repeat the log line.
                if left is None or task.cancel_reason is not None:
                    continue
                if now - left >= settings.client_gone_grace_seconds:
                    logger.info("task %s: no client for %.0fs; cancelling", task.id, now - left)
                    if await task.cancel("client_gone"):
                        self._observe.client_gone()
            self.registry.purge()
            self.sessions.purge(settings.task_retention_seconds)
            if self.journal is not None:
                self.journal.purge()
            await self.removals.retry()

    async def shutdown(self) -> None:
        """End every session and one-off run; their clients get task_finish."""
        await self.sessions.shutdown()
        for task in self.registry.active():
            await task.cancel("shutdown")
        if self._runs:
            await asyncio.wait(set(self._runs), timeout=30.0)
        await self._remove_leftovers()

    async def _remove_leftovers(self) -> None:
        """Remove what the engine would not remove before, trying for a few seconds; what it still refuses is
        named (the next start finds it by its labels)."""
        deadline = time.monotonic() + SHUTDOWN_REMOVAL_SECONDS
        while await self.removals.retry(every=True) and time.monotonic() < deadline:
            await asyncio.sleep(JANITOR_INTERVAL_SECONDS)
        if self.removals.pending:
            logger.error(
                "containers left behind (the engine did not remove them): %s", ", ".join(self.removals.pending)
            )
