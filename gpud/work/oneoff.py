"""One-off tasks: an ephemeral container per task, removed (and its GPU released) in every outcome.

task_finish goes out as soon as the outcome is known, before the container's removal (about 20 ms of the engine's
time): the GPU of a container seen to exit is released before it (nothing runs on it any more, so a client may
submit again at once); the uid, the model and the GPU of a container that may still run stay held until it is gone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gpud.errors import GpudError, Unavailable
from gpud.gpu.scheduler import Lease, Scheduler
from gpud.modelstore import ModelStore
from gpud.runtime.base import ContainerNotFound, ContainerRuntime, EngineUnavailable, ExitStatus, Mount, Stream
from gpud.runtime.spec import build_spec
from gpud.work.event import EventType
from gpud.work.launch import (
    STOP_GRACE_SECONDS,
    TAIL_LINE_CHARS,
    gpu_device,
    image_progress,
    log_tail,
    model_progress,
    quote_tail,
    timeout_error,
)
from gpud.work.outage import OutputFollower, drain, wait_exit
from gpud.work.removals import PendingRemovals
from gpud.work.task import CancelHook, Task, TaskError, TaskStatus, cancel_error
from gpud.work.textcap import LongLines
from gpud.work.timings import since
from gpud.work.uids import WorkerIds, WorkerUser

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

TASK_INPUT_DIR = "/run/gpud-task"
# Leases a GPU (difficulty, holder, kind, model) or raises Unavailable: gpud.work.capacity's may end an idle session.
Acquire = Callable[[str, str, str, str], Awaitable[Lease]]


@dataclass(frozen=True)
class Outcome:
    """How a task ended, decided before its resources are released and task_finish is sent."""

    status: TaskStatus
    error: TaskError | None = None
    exit_code: int | None = None
    exited: bool = False  # the container was seen to exit (it no longer runs on its GPU)


class OneOffRunner:
    """Runs one task in its own container: input in, stdout as text deltas, stderr as logs, exit status out."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        store: ModelStore,
        scheduler: Scheduler,
        work_dir: Path,
        ids: WorkerIds,
        removals: PendingRemovals | None = None,
        acquire: Acquire | None = None,
    ) -> None:
        self._runtime = runtime
        self._store = store
        self._scheduler = scheduler
        self._work_dir = work_dir
        self._ids = ids
        self._removals = removals or PendingRemovals(runtime)
        self._acquire = acquire or self._acquire_free

    def admit(self, task: Task) -> WorkerUser:
        """The host user the task's container will run as, allocated now: a full uid range is a 503 at submit."""
        return self._ids.for_preset(task.preset.user, task.id)

    async def run(self, task: Task, lease: Lease | None, user: WorkerUser) -> None:
        """Run the task (as `user`, from admit) to its end; never raises (errors become the task's failure).
        Without a lease (the model was not cached at submit) the GPU is leased once the model is there."""
        held = [lease] if lease is not None else []  # the lease, once there is one (cleanup releases it)
        stopper = asyncio.Event()
        input_dir = self._work_dir / task.id
        await self._guarded(task, held, user, stopper, self._execute(task, held, user, input_dir, stopper))

    async def resume(self, task: Task, lease: Lease | None, user: WorkerUser, timeout: float) -> None:
        """Follow a task whose container (task.container_id) survived gpud's restart to its end, as run() would
        from the container's start: output, the `timeout` seconds it has left, cancel, outcome, cleanup."""
        held = [lease] if lease is not None else []
        stopper = asyncio.Event()
        await self._guarded(task, held, user, stopper, self._supervise(task, stopper, timeout))

    async def _guarded(
        self,
        task: Task,
        held: list[Lease],
        user: WorkerUser,
        stopper: asyncio.Event,
        work: Coroutine[Any, Any, Outcome],
    ) -> None:
        """Await the work; whatever happens, finish the task with the outcome, then clean up."""
        input_dir = self._work_dir / task.id
        task.cancel_hook = _cancel_hook(stopper)
        outcome = Outcome(TaskStatus.FAILED, TaskError("internal_error", "the task ended unexpectedly"))
        try:
            outcome = await work
        except GpudError as exc:
            outcome = Outcome(TaskStatus.FAILED, TaskError(exc.code, exc.message))
        except asyncio.CancelledError:
            outcome = Outcome(TaskStatus.CANCELLED, cancel_error("shutdown"))
            raise
        except Exception as exc:
            logger.exception("one-off task %s failed unexpectedly", task.id)
            outcome = Outcome(TaskStatus.FAILED, TaskError("internal_error", f"internal error: {exc}"))
        finally:
            if outcome.exited or task.container_id is None:  # nothing runs on the GPU (any more)
                while held:
                    self._scheduler.release(held.pop())
            # The input is gone by task_finish (it may hold secrets), whether or not the engine removes the container.
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, input_dir)
            task.finish(outcome.status, error=outcome.error, exit_code=outcome.exit_code)
            await self._remove(task, held, user)

    async def _execute(
        self, task: Task, held: list[Lease], user: WorkerUser, input_dir: Path, stopper: asyncio.Event
    ) -> Outcome:
        if held:
            task.emit(EventType.CONNECTION, status="gpu_allocated", gpu_id=held[0].gpu.index)
        # A cancel (DELETE, client gone, shutdown) stops the wait for the model at once.
        fetch = self._store.ensure(task.request.model_id, model_progress(task), holder=task.id)
        started = time.monotonic()
        model_dir = await _unless_stopped(stopper, fetch)
        if model_dir is None:
            return Outcome(TaskStatus.CANCELLED, _cancel_error(task))
        task.timings.model_fetch_seconds = since(started)
        if not held:
            held.append(await self._lease_after_fetch(task))
        lease = held[0]
        started = time.monotonic()  # the worker's start: image, input, container
        await self._runtime.ensure_image(task.preset.image, image_progress(task))
        if stopper.is_set():
            return Outcome(TaskStatus.CANCELLED, _cancel_error(task))
        payload = json.dumps(dict(task.request.metadata))
        await asyncio.get_running_loop().run_in_executor(None, _write_input, input_dir, payload, user)
        spec = build_spec(
            task.preset,
            user=user.spec,
            task_id=task.id,
            gpu=gpu_device(lease),
            model_dir=model_dir,
            mounts=[Mount(str(input_dir), TASK_INPUT_DIR, read_only=True)],
            # Only the file: an environment is readable wherever the process is listed (podman inspect, /proc).
            env={"GPUD_TASK_INPUT_FILE": f"{TASK_INPUT_DIR}/input.json"},
            stop_grace_seconds=STOP_GRACE_SECONDS,
        )
        task.container_id = await self._runtime.run(spec)
        task.emit(EventType.WORKER, status="created", container_id=task.container_id)
        task.timings.worker_start_seconds = since(started)
        task.mark_running()
        task.emit(EventType.WORKER, status="working", container_id=task.container_id)
        return await self._supervise(task, stopper)

    async def _acquire_free(self, difficulty: str, holder: str, kind: str, model: str) -> Lease:
        return self._scheduler.acquire(difficulty, holder, kind, model)

    async def _lease_after_fetch(self, task: Task) -> Lease:
        """Lease the GPU now that the model is cached; none free (taken during the fetch) fails the task."""
        try:
            lease = await self._acquire(task.request.difficulty, task.id, "task", task.request.model_id)
        except Unavailable as exc:
            raise Unavailable(
                f"{exc.message} now that the model is fetched (it stays cached: a new submission starts at once"
                " once a GPU is free)",
                code=exc.code,
                retry_after=exc.retry_after,
            ) from exc
        task.gpu_id = lease.gpu.index
        task.emit(EventType.CONNECTION, status="gpu_allocated", gpu_id=lease.gpu.index)
        return lease

    async def _supervise(self, task: Task, stopper: asyncio.Event, timeout: float | None = None) -> Outcome:
        """Pump output while waiting for exit, the timeout (the task's, or `timeout` seconds), or a cancel; then
        decide the outcome once the output is read to its end. An engine that stops answering meanwhile is
        waited for (gpud/work/outage.py): the task goes on, and ends when the container does."""
        assert task.container_id is not None
        what = f"task {task.id}"
        tail = log_tail()
        follower = OutputFollower(self._runtime, task.container_id, what)
        pump = asyncio.create_task(self._pump(task, tail, follower))
        waiter = asyncio.create_task(wait_exit(self._runtime, task.container_id, what))
        stop_wait = asyncio.create_task(stopper.wait())
        try:
            # The timeout counts from the container's start, as for session tasks (not the model fetch before).
            timeout = task.request.timeout_seconds if timeout is None else timeout
            done, _ = await asyncio.wait({waiter, stop_wait}, timeout=timeout, return_when="FIRST_COMPLETED")
            if waiter not in done:
                exited = await self._stop(task, waiter)
                status = TaskStatus.CANCELLED if stopper.is_set() else TaskStatus.TIMEOUT
                await self._drain(task, pump, follower, exited)
                error = _cancel_error(task) if stopper.is_set() else timeout_error(task)
                return Outcome(status, error, exited=exited)
            await self._drain(task, pump, follower, True)
            return _outcome_of_exit(task, waiter.result(), tail)
        finally:
            for pending in (pump, waiter, stop_wait):
                pending.cancel()
            await asyncio.gather(pump, waiter, stop_wait, return_exceptions=True)

    async def _stop(self, task: Task, waiter: asyncio.Task[ExitStatus]) -> bool:
        """Stop the container; True once it has exited. False when the engine does not answer: it may still run
        (cleanup then keeps it, and its GPU, until a later removal succeeds)."""
        assert task.container_id is not None
        try:
            await self._runtime.stop(task.container_id, STOP_GRACE_SECONDS)
        except ContainerNotFound:
            return True
        except EngineUnavailable as exc:
            logger.warning("task %s: could not stop container %s: %s", task.id, task.container_id, exc)
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), STOP_GRACE_SECONDS + 30.0)
        return waiter.done()

    @staticmethod
    async def _drain(task: Task, pump: asyncio.Task[None], follower: OutputFollower, exited: bool) -> None:
        """Let the output written before the exit reach the task before task_finish; when it cannot be read to
        its end, the task says its output is truncated."""
        if exited and await drain(pump, follower) and follower.whole:
            return
        why = "the container's output could not be read to its end"
        if not exited:
            why += " (the container could not be stopped: the engine does not answer)"
        elif follower.lost_while_away:
            why = "the container ended while the engine did not answer, and that engine keeps no output meanwhile"
        task.output_truncated = True
        task.emit(EventType.LOGS, stream="gpud", line=f"output truncated: {why}")

    async def _pump(self, task: Task, tail: collections.deque[str], follower: OutputFollower) -> None:
        long_lines = LongLines()
        async for line in follower:
            if line.stream is Stream.STDOUT:
                # A long line comes in pieces; none is lost, and only its last piece ends with the newline.
                task.emit(EventType.TEXT_DELTA, delta=line.line if line.partial else line.line + "\n")
                continue
            whole = long_lines.feed(line.stream.value, line.line, line.partial)
            if whole is not None:
                tail.append(whole[0][:TAIL_LINE_CHARS])
                task.log.append_line(line.stream.value, *whole)
        for stream, head, dropped in long_lines.flush():
            task.log.append_line(stream, head, dropped)

    async def _remove(self, task: Task, held: list[Lease], user: WorkerUser) -> None:
        """Remove the container; release the model, uid and GPU (if still `held`) once it is gone, later if the engine
        does not answer now."""

        def gone() -> None:
            for lease in held:
                self._scheduler.release(lease)
            self._ids.release(user)
            self._store.release(task.request.model_id, task.id)

        if task.container_id is None:
            gone()
        elif not await self._removals.remove(task.container_id, f"task {task.id}", gone):
            # A worker that may still run keeps its uid (the next holder must not share it), and its GPU.
            logger.warning(
                "task %s: its uid %d%s stay reserved until the container is removed",
                task.id,
                user.uid,
                " and GPU" if held else "",
            )


async def _unless_stopped(stopper: asyncio.Event, work: Coroutine[Any, Any, _T]) -> _T | None:
    """The result of work, or None once stopper is set first (work is then cancelled and waited for)."""
    job = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopper.wait())
    try:
        await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (job, stop):
            pending.cancel()
        await asyncio.gather(job, stop, return_exceptions=True)
    if job.cancelled():
        return None
    return job.result()


def _cancel_hook(stopper: asyncio.Event) -> CancelHook:
    async def cancel(reason: str) -> None:
        stopper.set()

    return cancel


def _write_input(input_dir: Path, payload: str, user: WorkerUser) -> None:
    """The task input as a file only the worker's uid can read: the directory 0700 and the file 0400, both the
    worker's. Both stay root's until written, so nothing can be swapped in before the chown."""
    shutil.rmtree(input_dir, ignore_errors=True)
    input_dir.mkdir(parents=True, mode=0o700)
    hand_over = (user.uid, user.gid) != (os.geteuid(), os.getegid())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(input_dir / "input.json", flags, 0o400), "wb") as file:
        file.write(payload.encode("utf-8"))
        if hand_over:
            os.fchown(file.fileno(), user.uid, user.gid)
    if hand_over:
        os.chown(input_dir, user.uid, user.gid)


def _cancel_error(task: Task) -> TaskError:
    return cancel_error(task.cancel_reason or "cancelled")


def _outcome_of_exit(task: Task, status: ExitStatus, tail: Collection[str]) -> Outcome:
    if status.exit_code == 0 and not status.oom_killed:
        return Outcome(TaskStatus.COMPLETED, exit_code=0, exited=True)
    if status.oom_killed:
        message = f"worker ran out of memory (limit {task.preset.limits.memory_bytes} bytes) and was killed"
        code = "out_of_memory"
    else:
        message = f"worker exited with code {status.exit_code}"
        code = "worker_failed"
    return Outcome(TaskStatus.FAILED, TaskError(code, message + quote_tail(tail)), status.exit_code, exited=True)
