"""One-off tasks: an ephemeral container per task, removed (and its GPU released) in every outcome."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from gpud.errors import GpudError
from gpud.gpu.scheduler import Lease, Scheduler
from gpud.modelstore import ModelStore
from gpud.runtime.base import ContainerRuntime, ExitStatus, Mount, Stream
from gpud.runtime.spec import build_spec
from gpud.work.events import EventType
from gpud.work.launch import (
    STOP_GRACE_SECONDS,
    gpu_device,
    image_progress,
    log_tail,
    model_progress,
    quote_tail,
    timeout_error,
)
from gpud.work.task import CancelHook, Task, TaskError, TaskStatus, cancel_error

logger = logging.getLogger(__name__)

TASK_INPUT_DIR = "/run/gpud-task"


@dataclass(frozen=True)
class Outcome:
    """How a task ended, decided before its resources are released and task_finish is sent."""

    status: TaskStatus
    error: TaskError | None = None
    exit_code: int | None = None


class OneOffRunner:
    """Runs one task in its own container: input in, stdout as text deltas, stderr as logs, exit status out."""

    def __init__(self, runtime: ContainerRuntime, store: ModelStore, scheduler: Scheduler, work_dir: Path) -> None:
        self._runtime = runtime
        self._store = store
        self._scheduler = scheduler
        self._work_dir = work_dir

    async def run(self, task: Task, lease: Lease) -> None:
        """Run the task to its end; never raises (errors become the task's failure)."""
        input_dir = self._work_dir / task.id
        stopper = asyncio.Event()
        task.cancel_hook = _cancel_hook(stopper)
        outcome = Outcome(TaskStatus.FAILED, TaskError("internal_error", "the task ended unexpectedly"))
        try:
            task.emit(EventType.CONNECTION, status="gpu_allocated", gpu_id=lease.gpu.index)
            outcome = await self._execute(task, lease, input_dir, stopper)
        except GpudError as exc:
            outcome = Outcome(TaskStatus.FAILED, TaskError(exc.code, exc.message))
        except asyncio.CancelledError:
            outcome = Outcome(TaskStatus.CANCELLED, cancel_error("shutdown"))
            raise
        except Exception as exc:
            logger.exception("one-off task %s failed unexpectedly", task.id)
            outcome = Outcome(TaskStatus.FAILED, TaskError("internal_error", f"internal error: {exc}"))
        finally:
            # GPU and container are released before task_finish, so a client may submit again at once.
            await self._cleanup(task, lease, input_dir)
            task.finish(outcome.status, error=outcome.error, exit_code=outcome.exit_code)

    async def _execute(self, task: Task, lease: Lease, input_dir: Path, stopper: asyncio.Event) -> Outcome:
        model_dir = await self._store.ensure(task.request.model_id, model_progress(task), holder=task.id)
        await self._runtime.ensure_image(task.preset.image, image_progress(task))
        if stopper.is_set():
            return Outcome(TaskStatus.CANCELLED, _cancel_error(task))
        payload = json.dumps(dict(task.request.metadata))
        await asyncio.get_running_loop().run_in_executor(None, _write_input, input_dir, payload)
        spec = build_spec(
            task.preset,
            task_id=task.id,
            gpu=gpu_device(lease),
            model_dir=model_dir,
            mounts=[Mount(str(input_dir), TASK_INPUT_DIR, read_only=True)],
            env={"GPUD_TASK_INPUT": payload, "GPUD_TASK_INPUT_FILE": f"{TASK_INPUT_DIR}/input.json"},
            stop_grace_seconds=STOP_GRACE_SECONDS,
        )
        task.container_id = await self._runtime.run(spec)
        task.emit(EventType.WORKER, status="created", container_id=task.container_id)
        task.mark_running()
        task.emit(EventType.WORKER, status="working", container_id=task.container_id)
        return await self._supervise(task, stopper)

    async def _supervise(self, task: Task, stopper: asyncio.Event) -> Outcome:
        """Pump output while waiting for exit, the timeout, or a cancel; then finish the task."""
        assert task.container_id is not None
        tail = log_tail()
        pump = asyncio.create_task(self._pump(task, tail))
        waiter = asyncio.create_task(self._runtime.wait(task.container_id))
        stop_wait = asyncio.create_task(stopper.wait())
        try:
            # The timeout counts from the container's start, as for session tasks (not the model fetch before).
            timeout = task.request.timeout_seconds
            done, _ = await asyncio.wait({waiter, stop_wait}, timeout=timeout, return_when="FIRST_COMPLETED")
            if waiter not in done:
                await self._runtime.stop(task.container_id, STOP_GRACE_SECONDS)
                await waiter
                status = TaskStatus.CANCELLED if stopper.is_set() else TaskStatus.TIMEOUT
                await _drain(pump)
                error = _cancel_error(task) if stopper.is_set() else timeout_error(task)
                return Outcome(status, error)
            await _drain(pump)
            return _outcome_of_exit(task, waiter.result(), tail)
        finally:
            for pending in (pump, waiter, stop_wait):
                pending.cancel()
            await asyncio.gather(pump, waiter, stop_wait, return_exceptions=True)

    async def _pump(self, task: Task, tail: collections.deque[str]) -> None:
        assert task.container_id is not None
        async for line in self._runtime.logs(task.container_id, follow=True):
            if line.stream is Stream.STDOUT:
                task.emit(EventType.TEXT_DELTA, delta=line.line + "\n")
            else:
                tail.append(line.line)
                task.emit(EventType.LOGS, stream=line.stream.value, line=line.line)

    async def _cleanup(self, task: Task, lease: Lease, input_dir: Path) -> None:
        """Remove the container, release the model and the GPU, delete the input; each step on its own."""
        if task.container_id is not None:
            try:
                await asyncio.shield(self._runtime.remove(task.container_id))
            except Exception:
                logger.exception("could not remove container %s of task %s", task.container_id, task.id)
        self._store.release(task.request.model_id, task.id)
        self._scheduler.release(lease)
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, input_dir)


async def _drain(pump: asyncio.Task[None]) -> None:
    """Let output already written reach the stream before task_finish; an engine that never ends the log
    stream must not hold the outcome hostage."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(pump), timeout=5.0)


def _cancel_hook(stopper: asyncio.Event) -> CancelHook:
    async def cancel(reason: str) -> None:
        stopper.set()

    return cancel


def _write_input(input_dir: Path, payload: str) -> None:
    """The task input as a file, readable by the unprivileged worker user."""
    input_dir.mkdir(parents=True, exist_ok=True)
    input_dir.chmod(0o755)
    path = input_dir / "input.json"
    path.write_text(payload, encoding="utf-8")
    path.chmod(0o644)


def _cancel_error(task: Task) -> TaskError:
    return cancel_error(task.cancel_reason or "cancelled")


def _outcome_of_exit(task: Task, status: ExitStatus, tail: Collection[str]) -> Outcome:
    if status.exit_code == 0 and not status.oom_killed:
        return Outcome(TaskStatus.COMPLETED, exit_code=0)
    if status.oom_killed:
        message = f"worker ran out of memory (limit {task.preset.limits.memory_bytes} bytes) and was killed"
        code = "out_of_memory"
    else:
        message = f"worker exited with code {status.exit_code}"
        code = "worker_failed"
    return Outcome(TaskStatus.FAILED, TaskError(code, message + quote_tail(tail)), status.exit_code)
