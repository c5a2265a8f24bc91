"""Drives sessions: starts the worker, runs queued tasks one by one, enforces timers, cancels, kills, restarts."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from gpud.clock import Clock, SystemClock
from gpud.errors import GpudError
from gpud.gpu.scheduler import Lease, Scheduler
from gpud.metrics import Metrics
from gpud.modelstore import ModelStore
from gpud.runtime.base import ContainerRuntime
from gpud.settings import LiveConfig
from gpud.work.event import EventType
from gpud.work.launch import image_progress, model_progress
from gpud.work.removals import PendingRemovals
from gpud.work.sessions.endings import end_tasks, logged, output_to
from gpud.work.sessions.output import WorkerOutput
from gpud.work.sessions.record import Session, SessionRecords, SessionRegistry, SessionState
from gpud.work.sessions.taskrun import RunOutcome, TaskRun
from gpud.work.sessions.wakeup import Wakeup
from gpud.work.sessions.worker import SessionWorker, WorkerCrashed
from gpud.work.task import Task, TaskError, TaskStatus, cancel_error
from gpud.work.uids import WorkerIds, WorkerUser

logger = logging.getLogger(__name__)


class SessionManager:
    """Owns every session's life: one asyncio task per session runs its queue in FIFO order."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        store: ModelStore,
        scheduler: Scheduler,
        config: LiveConfig,
        socket_root: Path,
        sdk_dir: Path,
        clock: Clock | None = None,
        *,
        ids: WorkerIds,
        records: SessionRecords | None = None,
        removals: PendingRemovals | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._runtime = runtime
        self._store = store
        self._scheduler = scheduler
        self._config = config
        self._socket_root = socket_root
        self._sdk_dir = sdk_dir
        self._clock = clock or SystemClock()
        self.registry = SessionRegistry(records)
        self._lives: dict[str, asyncio.Task[None]] = {}
        self._wakeups: dict[str, Wakeup] = {}
        self._begun: dict[str, TaskRun] = {}  # a task enqueue sent to an idle worker, until the session supervises it
        self._workers: dict[str, SessionWorker] = {}
        self._ids = ids
        self._users: dict[str, WorkerUser] = {}  # session id -> the host user its workers run as
        self._removals = removals or PendingRemovals(runtime)

    @property
    def clock(self) -> Clock:
        """The clock sessions' timers run on."""
        return self._clock

    # --- entry points ---------------------------------------------------------------------------------

    def open(self, task: Task, lease: Lease) -> Session:
        """Start a new session for `task` on the leased GPU; the task runs first once the worker is ready.
        Raises WorkerIdsExhausted (503), before anything is registered, when no worker uid is free."""
        # One uid for the session's life (a restarted worker keeps it), given back at teardown.
        self._users[lease.holder] = self._ids.for_preset(task.preset.user, lease.holder)
        session = Session(
            id=lease.holder, preset=task.preset, difficulty=task.request.difficulty, lease=lease, clock=self._clock
        )
        self.registry.add(session)
        task.session_id = session.id
        task.gpu_id = lease.gpu.index
        session.queue.append(task)
        self._attach_cancel(session, task)
        self._wakeups[session.id] = Wakeup()
        self._lives[session.id] = asyncio.create_task(self._life(session, task), name=f"session-{session.id}")
        return session

    def enqueue(self, session: Session, task: Task) -> None:
        """Queue a task on a live session (FIFO); raises Gone or Busy when it cannot take it."""
        settings = self._config.settings
        session.check_accepts(settings.session_max_lifetime_seconds, settings.session_queue_max_size)
        task.session_id = session.id
        task.gpu_id = session.lease.gpu.index
        session.touch()
        self._attach_cancel(session, task)
        if session.state is not SessionState.STARTING:
            task.emit(EventType.CONNECTION, status="session_ready", gpu_id=task.gpu_id, session_id=session.id)
        worker = self._workers.get(session.id)
        if session.state is SessionState.READY and session.current is None and not session.queue and worker:
            # The worker waits idle: the task starts from this request's own step, not loop turns later from the
            # session's task (which wakes to supervise it); `working` leaves with `connection`.
            self._begun[session.id] = self._begin(session, worker, task, after_this_step=True)
        else:
            session.queue.append(task)
            # Only a task that really waits is told its place.
            task.emit(
                EventType.WORKER, status="queued", container_id=session.container_id, queue_position=len(session.queue)
            )
        self._wake(session)

    def keepalive(self, session: Session) -> None:
        """Reset the idle timer; Gone if the session has ended."""
        session.check_accepts(self._config.settings.session_max_lifetime_seconds, queue_max=1 << 30)
        session.touch()
        session.changed()  # the idle timer must survive a restart too
        self._wake(session)

    def output(self, session: Session) -> WorkerOutput | None:
        """What the session's current worker has written (container output and `log` lines); None without one."""
        worker = self._workers.get(session.id)
        return None if worker is None else worker.output

    def adopt(self, session: Session, worker: SessionWorker, user: WorkerUser) -> None:
        """Run a session whose worker survived gpud's restart and is ready again (gpud/work/sessions/adopt.py):
        its GPU is leased, its uid reserved, its model held; from here it lives like any other."""
        self._users[session.id] = user
        self._workers[session.id] = worker
        self.registry.add(session)
        self._wakeups[session.id] = Wakeup()
        self._lives[session.id] = asyncio.create_task(self._life(session, None, worker), name=f"session-{session.id}")

    def worker_for(self, session: Session, first_task_id: str, model_dir: Path, user: WorkerUser) -> SessionWorker:
        """A worker for the session (not started): its socket directory, the SDK, the reconnect time."""
        return SessionWorker(
            self._runtime,
            session.preset,
            session.id,
            first_task_id,
            session.lease,
            model_dir,
            self._socket_root / session.id[:16],
            self._sdk_dir,
            user,
            reconnect_seconds=self._config.settings.worker_reconnect_seconds,
        )

    async def kill(self, session: Session, reason: str = "killed") -> None:
        """End the session: running and queued tasks finish as cancelled; returns once the container is gone."""
        if session.stop_reason is None:
            session.stop_reason = reason
        self._wake(session)
        life = self._lives.get(session.id)
        if life is None:
            return
        if session.state is SessionState.STARTING:
            life.cancel()  # loading may take minutes; a kill must not wait for it
        await asyncio.wait({life})

    async def shutdown(self) -> None:
        """End every live session (gpud is stopping)."""
        await asyncio.gather(*(self.kill(s, "shutdown") for s in self.registry.live()), return_exceptions=True)
        if self._lives:  # sessions that ended on their own may still be tearing down
            await asyncio.wait(set(self._lives.values()))

    def purge(self, retention: float) -> None:
        """Forget sessions that ended more than `retention` seconds ago."""
        self.registry.purge(self._clock.monotonic() - retention)

    def settings_changed(self) -> None:
        """Re-check every session's timers now (a reload may have shortened the idle timeout or lifetime)."""
        for session in self.registry.live():
            self._wake(session)

    # --- a session's life -------------------------------------------------------------------------------

    async def _life(self, session: Session, first: Task | None, worker: SessionWorker | None = None) -> None:
        """Start a worker for `first` (or take an adopted, ready one), run the queue, tear down."""
        crash: WorkerCrashed | None = None
        try:
            if worker is None:
                assert first is not None
                worker = await self._start(session, first)
            while (task := await self._next_task(session, worker)) is not None:
                worker = await self._run(session, worker, task)
        except WorkerCrashed as exc:
            crash = exc
            if exc.code == "worker_crashed" and self._metrics is not None:  # not a failed fetch or image
                self._metrics.worker_crashes.labels("session").inc()
        except Exception as exc:
            logger.exception("session %s failed unexpectedly", session.id)
            crash = WorkerCrashed(f"internal error: {exc}", None, [])
        finally:
            await self._teardown(session, worker, crash)

    async def _start(self, session: Session, first: Task) -> SessionWorker:
        """Start the worker; a failure is a WorkerCrashed that names `first`, the task that was waiting on it."""
        try:
            return await self._start_worker(session, first)
        except GpudError as exc:  # model fetch, image, engine or container errors, with their own codes
            raise WorkerCrashed(exc.message, None, [], code=exc.code, task=first) from exc
        except WorkerCrashed as crash:
            crash.task = crash.task or first
            raise

    async def _start_worker(self, session: Session, first: Task) -> SessionWorker:
        """Fetch the model and image, start the worker, wait for ready, then tell the waiting tasks."""
        started = time.monotonic()
        model_dir = await self._store.ensure(first.request.model_id, model_progress(first), holder=session.id)
        fetched = time.monotonic()
        await self._runtime.ensure_image(session.preset.image, image_progress(first))
        worker = self.worker_for(session, first.id, model_dir, self._users[session.id])
        self._workers[session.id] = worker
        created_at = [fetched]

        def created(container_id: str) -> None:
            created_at[0] = time.monotonic()
            session.container_id = container_id
            for task in session.queue:
                task.emit(EventType.WORKER, status="created", container_id=container_id, session_id=session.id)
                task.emit(EventType.WORKER, status="loading", container_id=container_id, session_id=session.id)

        ready = await worker.start(created)
        self._observe_start(session, first, started, fetched, created_at[0])
        session.ready_info = {"pid": ready.pid, "seconds_to_ready": round(ready.seconds_to_ready, 3), **ready.info}
        session.move(SessionState.READY)
        session.touch()
        for task in session.queue:
            task.emit(
                EventType.CONNECTION, status="session_ready", gpu_id=session.lease.gpu.index, session_id=session.id
            )
        return worker

    def _observe_start(self, session: Session, first: Task, started: float, fetched: float, created: float) -> None:
        """A worker is ready: the start's phases go on the task that waited for it, and into the metrics."""
        now = time.monotonic()
        if not first.final:
            first.timings.model_fetch_seconds = fetched - started
            first.timings.worker_start_seconds = now - fetched
        if self._metrics is not None:
            self._metrics.session_start.labels(session.preset.model_id).observe(now - started)
            self._metrics.worker_ready.labels(session.preset.model_id).observe(now - created)

    async def _next_task(self, session: Session, worker: SessionWorker) -> Task | None:
        """The next queued task, or None when the session must end (stop requested, idle, lifetime, crash)."""
        wake = self._wakeups[session.id]
        while True:
            if session.current is not None and session.stop_reason is None:
                return session.current  # started by enqueue (the worker was idle): it runs, as any started task
            settings = self._config.settings
            now = self._clock.monotonic()
            expires = session.expires_at(settings.session_max_lifetime_seconds)
            if session.stop_reason is None and now >= expires:
                session.stop_reason = "max_lifetime"
            if session.stop_reason is not None:
                return None
            if session.queue:
                return session.queue.popleft()
            idle_deadline = session.idle_deadline(settings.session_idle_timeout_seconds)
            if now >= idle_deadline:
                session.stop_reason = "idle_timeout"
                return None
            wake.clear()
            waiter = wake.future()
            await self._clock.wait({waiter, worker.exited}, min(idle_deadline, expires))
            waiter.cancel()
            if worker.exited.done():
                raise await worker.crash("worker exited while idle")

    async def _run(self, session: Session, worker: SessionWorker, task: Task) -> SessionWorker:
        """Run one task on the worker; returns the worker to use next (a new one after a restart).

        `session.current` stays set until the task is final: whatever escapes from here (an unexpected error, a
        crash, a cancellation), the teardown still finds the running task and finishes it."""
        try:
            run = self._begun.pop(session.id, None)
            if run is None or run.task is not task:
                run = self._begin(session, worker, task)
            try:
                outcome = await run.run()
            finally:
                run.abandon()  # whatever ended it, no event of the task arrives after this (run() does it too)
                worker.on_output = None
                session.tasks_run += 1
                session.touch()
            if outcome is RunOutcome.CRASHED:
                raise await worker.crash("worker crashed while running a task")
        except WorkerCrashed as crash:
            crash.task = crash.task or task
            raise
        except Exception as exc:
            # Whatever went wrong, the running task must end with the session, not wait out its timeout.
            logger.exception("session %s: task %s failed unexpectedly", session.id, task.id)
            raise WorkerCrashed(f"internal error: {exc}", None, [], code="internal_error", task=task) from exc
        if not task.final:  # every other outcome has finished the task; one that did not must not leave it hanging
            task.finish(TaskStatus.FAILED, error=TaskError("internal_error", "the task ended without an outcome"))
        session.current = None
        if outcome is RunOutcome.RESTART:
            return await self._restart(session, worker, task)
        if outcome is RunOutcome.OK:
            session.move(SessionState.READY)
        return worker

    async def _restart(self, session: Session, old: SessionWorker, task: Task) -> SessionWorker:
        """Replace a worker that would not stop a task: same session, GPU and queue; a fresh container."""
        logger.warning("session %s: worker did not stop task %s in time; restarting it", session.id, task.id)
        session.move(SessionState.STARTING)
        session.restarts += 1
        if self._metrics is not None:
            self._metrics.session_restarts.inc()
        if not await old.stop() and old.container_id is not None:  # removed later; the session keeps the GPU
            self._removals.hold_all([old.container_id], f"session {session.id}", lambda: None)
        self._store.release(session.preset.model_id, session.id)
        for queued in session.queue:
            queued.emit(EventType.LOGS, stream="gpud", line="session worker is restarting (a task would not stop)")
        first = session.queue[0] if session.queue else task
        return await self._start(session, first)

    # --- endings ---------------------------------------------------------------------------------------

    async def _teardown(self, session: Session, worker: SessionWorker | None, crash: WorkerCrashed | None) -> None:
        """Stop the container and release model and GPU first, then finish the session's tasks. Each step runs
        even if one before it fails (or the teardown is cancelled): the tasks always end, the GPU always returns."""
        stuck: list[SessionWorker] | None = None  # workers whose containers the engine did not remove
        begun = self._begun.pop(session.id, None)
        if begun is not None:  # started by enqueue, never supervised: the session ended first, and says why
            begun.abandon()
        try:
            if crash is None and session.state is not SessionState.STOPPING and not session.is_over:
                with logged(f"session {session.id}: marking it stopping"):
                    session.move(SessionState.STOPPING)
            # The latest worker may differ from the one the loop held (a restart that failed half way): stop both.
            latest = self._workers.pop(session.id, None)
            stuck = [each for each in {w for w in (worker, latest) if w is not None} if not await each.stop()]
        finally:
            with logged(f"session {session.id}: releasing its model, GPU and worker uid"):
                self._release(session, stuck)
            with logged(f"session {session.id}: ending its tasks"):
                end_tasks(session, crash)
            self._lives.pop(session.id, None)
            self._wakeups.pop(session.id, None)

    # --- helpers ---------------------------------------------------------------------------------------

    def _begin(self, session: Session, worker: SessionWorker, task: Task, after_this_step: bool = False) -> TaskRun:
        """Make `task` the session's current one and send it to the worker (TaskRun.start); _run supervises it."""
        session.current = task
        session.move(SessionState.WORKING)
        session.announce_positions()
        task.mark_running()
        worker.on_output = output_to(task)
        run = TaskRun(session, worker, task, self._wakeups[session.id], self._clock)
        run.start(after_this_step=after_this_step)
        return run

    def _release(self, session: Session, stuck: list[SessionWorker] | None) -> None:
        """Model, GPU and uid go back once the containers are gone: now, or when a later removal succeeds (the
        GPU now if they were seen to exit). A worker that may still run keeps them: none is ever held twice."""
        user = self._users.pop(session.id, None)

        def gone() -> None:  # each step on its own: one failing must not keep the others
            with logged(f"session {session.id}: releasing its GPU"):
                self._scheduler.release(session.lease)
            with logged(f"session {session.id}: releasing its model"):
                self._store.release(session.preset.model_id, session.id)
            if user is not None and stuck is not None:  # after an interrupted teardown, the uid stays reserved
                self._ids.release(user)

        ids = [w.container_id for w in stuck or [] if w.container_id is not None]
        if ids:
            if all(w.seen_exit for w in stuck or []):
                self._scheduler.release(session.lease)
            logger.warning("session %s: its GPU and uid stay reserved until its container is removed", session.id)
        self._removals.hold_all(ids, f"session {session.id}", gone)

    def _wake(self, session: Session) -> None:
        wake = self._wakeups.get(session.id)
        if wake is not None:
            wake.set()

    def _attach_cancel(self, session: Session, task: Task) -> None:
        async def cancel(reason: str) -> None:
            if task in session.queue:
                session.queue.remove(task)
                task.finish(TaskStatus.CANCELLED, error=cancel_error(reason))
                session.announce_positions()
            else:
                self._wake(session)  # the supervisor sees task.cancel_reason and tells the worker

        task.cancel_hook = cancel
