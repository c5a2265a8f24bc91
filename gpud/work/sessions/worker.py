"""One session's worker: its container, its protocol channel, its output, and how it ended."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpud.gpu.scheduler import Lease
from gpud.runtime.base import ContainerNotFound, ContainerRuntime, EngineUnavailable, ExitStatus, LogLine, Mount
from gpud.runtime.spec import build_spec
from gpud.settings.presets import Preset
from gpud.work.launch import STOP_GRACE_SECONDS, gpu_device, log_tail, quote_tail
from gpud.work.outage import OutputFollower, wait_exit
from gpud.work.sessions.output import WorkerOutput
from gpud.work.task import Task
from gpud.work.uids import WorkerUser
from gpud.worker import session_worker_env
from gpud.worker.channel import WorkerChannel
from gpud.worker.messages import ReadyInfo, WorkerError
from gpud.worker.protocol import CONTAINER_SDK_DIR, CONTAINER_SOCKET_DIR, DEFAULT_RECONNECT_SECONDS

logger = logging.getLogger(__name__)

LOST = "worker_lost"  # the code of an adopted session whose worker did not come back after gpud's restart


class WorkerCrashed(Exception):
    """The worker's container exited or its connection dropped; carries the exit status and last lines."""

    def __init__(
        self,
        message: str,
        status: ExitStatus | None,
        tail: list[str],
        code: str = "worker_crashed",
        task: Task | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.tail = tail
        self.code = code  # what the task's error says, e.g. model_fetch_failed before any container ran
        self.task = task  # the task that was running (or waiting for the worker to start), if any

    def describe(self) -> str:
        """A message for the task's error: what happened, the exit code, the last log lines."""
        text = str(self)
        if self.status is not None:
            text += f" (exit code {self.status.exit_code}{', out of memory' if self.status.oom_killed else ''})"
        return text + quote_tail(self.tail)


def _lost(crash: WorkerCrashed) -> WorkerCrashed:
    crash.code = LOST
    return crash


class SessionWorker:
    """Starts a long-lived worker container speaking the worker protocol, and stops it."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        preset: Preset,
        session_id: str,
        first_task_id: str,
        lease: Lease,
        model_dir: Path,
        socket_dir: Path,
        sdk_dir: Path,
        user: WorkerUser,
        *,
        reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
    ) -> None:
        self._runtime = runtime
        self._preset = preset
        self._session_id = session_id
        self._first_task_id = first_task_id
        self._lease = lease
        self._model_dir = model_dir
        self._socket_dir = socket_dir
        self._sdk_dir = sdk_dir
        self._user = user
        self._reconnect_seconds = reconnect_seconds
        # Only the worker's uid may enter the socket's directory and connect (the channel checks SO_PEERCRED).
        self.channel = WorkerChannel(socket_dir, uid=user.uid, gid=user.gid)
        self.container_id: str | None = None
        self.ready: ReadyInfo | None = None
        self.tail = log_tail()
        self.output = WorkerOutput()  # all it wrote, for `gpuctl logs` (the session adds its protocol log lines)
        self.exited: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._background: list[asyncio.Task[None]] = []
        # Where container output goes while a task runs (the session points it at the current task).
        self.on_output: Callable[[LogLine], None] | None = None

    async def start(self, on_created: Callable[[str], None]) -> ReadyInfo:
        """Run the container and wait for `ready`; raises WorkerCrashed when it exits or never gets ready."""
        await self.channel.start()
        spec = build_spec(
            self._preset,
            user=self._user.spec,
            task_id=self._first_task_id,
            session_id=self._session_id,
            gpu=gpu_device(self._lease),
            model_dir=self._model_dir,
            mounts=[
                Mount(str(self._socket_dir), CONTAINER_SOCKET_DIR, read_only=False),
                Mount(str(self._sdk_dir), CONTAINER_SDK_DIR, read_only=True),
            ],
            env=session_worker_env(self._preset.env.get("PYTHONPATH"), self._reconnect_seconds),
            stop_grace_seconds=STOP_GRACE_SECONDS,
        )
        self.container_id = await self._runtime.run(spec)
        on_created(self.container_id)
        self._background = [asyncio.create_task(self._pump()), asyncio.create_task(self._watch_exit())]
        ready: asyncio.Future[Any] = asyncio.ensure_future(
            self.channel.wait_ready(self._preset.readiness_timeout_seconds)
        )
        exited: asyncio.Future[Any] = self.exited
        await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise await self.crash("worker exited before it was ready")
        try:
            self.ready = ready.result()
        except WorkerError as exc:
            raise await self.crash(f"worker did not become ready: {exc}") from None
        return self.ready

    async def reattach(self, container_id: str, timeout: float) -> ReadyInfo:
        """Take over a running container that a previous gpud started: re-create its socket in place (adopt),
        follow its output and exit, and wait up to `timeout` for its worker to reconnect and say ready again (its
        model still loaded). Raises WorkerCrashed with code `worker_lost` when it does not come back or exits."""
        self.container_id = container_id
        try:
            await self.channel.start(adopt=True)
        except OSError as exc:
            raise WorkerCrashed(f"cannot re-create the worker's socket: {exc}", None, [], code=LOST) from None
        self._background = [asyncio.create_task(self._pump()), asyncio.create_task(self._watch_exit())]
        ready: asyncio.Future[Any] = asyncio.ensure_future(self.channel.wait_ready(timeout))
        exited: asyncio.Future[Any] = self.exited
        await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise _lost(await self.crash("worker exited before it reconnected"))
        try:
            self.ready = ready.result()
        except WorkerError as exc:
            if not self.exited.done():  # still running but silent: no need to wait for an exit status
                raise WorkerCrashed(f"worker did not reconnect: {exc}", None, list(self.tail), code=LOST) from None
            raise _lost(await self.crash(f"worker did not reconnect: {exc}")) from None
        if not self.ready.resumed:
            logger.warning("session %s: the adopted worker did not resume; it said ready anew", self._session_id)
        return self.ready

    async def crash(self, message: str) -> WorkerCrashed:
        """A WorkerCrashed with the exit status (waiting briefly for it) and the last output lines."""
        status = None
        with contextlib.suppress(TimeoutError):
            status = await asyncio.wait_for(asyncio.shield(self.exited), 5.0)
        # Give the log pump a moment to deliver the container's last lines.
        await asyncio.sleep(0.2)
        return WorkerCrashed(message, status, list(self.tail))

    async def _pump(self) -> None:
        assert self.container_id is not None
        # Followed across engine outages (gpud/work/outage.py): the worker talks to gpud over its socket, not
        # through the engine, so it goes on serving while the engine does not answer.
        follower = OutputFollower(self._runtime, self.container_id, f"session {self._session_id}")
        with contextlib.suppress(Exception):
            async for line in follower:
                self.tail.append(line.line)
                self.output.add(line.stream.value, line.line, partial=line.partial)
                if self.on_output is not None:
                    self.on_output(line)

    async def _watch_exit(self) -> None:
        assert self.container_id is not None
        # An engine that stops answering is not an exit: the wait goes on until it answers again.
        status = await wait_exit(self._runtime, self.container_id, f"session {self._session_id}")
        if not self.exited.done():
            self.exited.set_result(status)

    @property
    def seen_exit(self) -> bool:
        """Whether the container was seen to exit (it no longer runs on its GPU)."""
        return self.exited.done() and not self.exited.cancelled()

    async def stop(self) -> bool:
        """Ask the worker to exit, then stop and remove its container; never raises. False when the container
        may still exist (its uid must then stay reserved)."""
        removed = True
        await self.channel.shutdown()
        if self.container_id is not None:
            try:
                await asyncio.shield(self._stop_container(self.container_id))
            except EngineUnavailable as exc:
                removed = False
                logger.warning("session %s: could not stop container %s: %s", self._session_id, self.container_id, exc)
            except Exception:
                removed = False
                logger.exception("could not remove session %s container %s", self._session_id, self.container_id)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.channel.close()
        self.output.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._socket_dir)
        if not self.exited.done():
            self.exited.cancel()
        return removed

    async def _stop_container(self, container_id: str) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), 1.0)  # it may exit by itself on `shutdown`
        with contextlib.suppress(ContainerNotFound):  # already gone is what we want
            await self._runtime.stop(container_id, STOP_GRACE_SECONDS)
            await self._runtime.remove(container_id)
