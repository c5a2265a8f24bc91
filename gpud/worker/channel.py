"""Host side of the worker protocol: gpud listens on a per-session Unix socket, one worker connects."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from gpud.worker.messages import (
    EventSink,
    ReadyInfo,
    TaskStream,
    WorkerBusy,
    WorkerError,
    WorkerEvent,
    WorkerGone,
    WorkerSetupFailed,
    WorkerTimeout,
)
from gpud.worker.peer import peer_of
from gpud.worker.protocol import (
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    SOCKET_NAME,
    HostMessage,
    LineFramer,
    ProtocolError,
    WorkerMessage,
    decode,
    decode_delta,
    delta_prefix,
    encode,
)
from gpud.worker.socketdir import bind_adopted, bind_fresh

logger = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024
# A worker sending garbage in a loop must not flood gpud's log: the first few protocol errors are logged, the
# rest counted (protocol_errors); each message about one is cut to a readable length.
_LOGGED_PROTOCOL_ERRORS = 10
_PROBLEM_CHARS = 300
_ERROR_CHARS = 4096
_TASK_EVENTS = frozenset(
    {
        WorkerMessage.TEXT_DELTA,
        WorkerMessage.TEXT,
        WorkerMessage.LOG,
        WorkerMessage.PROGRESS,
        WorkerMessage.RESULT,
        WorkerMessage.ERROR,
        WorkerMessage.DONE,
    }
)


class WorkerChannel:
    """Listens on `<socket_dir>/worker.sock`, accepts one worker running as `uid`, and runs its tasks one at a
    time. The directory and socket are handed to uid:gid (0700/0600); connections from any other uid are
    refused without taking the worker's place."""

    def __init__(self, socket_dir: Path, *, uid: int, gid: int, max_message: int = MAX_MESSAGE_SIZE) -> None:
        self.socket_dir = Path(socket_dir)
        self.socket_path = self.socket_dir / SOCKET_NAME
        self.uid, self.gid = uid, gid
        self._max = max_message
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._ready: asyncio.Future[ReadyInfo] | None = None
        self._hello: dict[str, Any] = {}
        self._running: TaskStream | None = None
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._ping_ids = itertools.count(1)
        self._gone: WorkerGone | None = None
        self._started_at = 0.0
        self.protocol_errors = 0
        self.refused_peers = 0  # connections from a uid other than the worker's

    @property
    def running_task(self) -> str | None:
        """The id of the task the worker is running, if any."""
        return self._running.task_id if self._running else None

    @property
    def gone(self) -> bool:
        """True once the worker's connection has closed."""
        return self._gone is not None

    async def start(self, *, adopt: bool = False) -> None:
        """Listen on a socket handed to the worker's uid; it may connect from now on. Normally in a new directory;
        with adopt, in the existing one (a running worker's container has it bind-mounted), for a worker that
        reconnects after gpud's restart. Raises OSError (SocketDirUnusable) when adopting cannot work."""
        bind = bind_adopted if adopt else bind_fresh
        sock = bind(self.socket_dir, self.uid, self.gid)
        self._ready = asyncio.get_running_loop().create_future()
        self._started_at = time.monotonic()
        try:
            self._server = await asyncio.start_unix_server(self._on_connect, sock=sock, limit=self._max)
        except BaseException:
            sock.close()
            raise

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer)
        if peer is None or peer.uid != self.uid:
            # Not the worker: refused, and the worker's place stays free for the real one.
            self.refused_peers += 1
            logger.warning(
                "worker socket %s: refusing a connection from pid %s uid %s (the worker runs as uid %d)",
                self.socket_path,
                peer.pid if peer else "?",
                peer.uid if peer else "?",
                self.uid,
            )
            writer.close()
            return
        if self._writer is not None or self._gone is not None:
            # Exactly one worker per session socket; a second connection is refused, not queued.
            logger.warning("worker socket %s: refusing a second connection", self.socket_path)
            writer.close()
            return
        self._writer = writer
        self._connected.set()
        self._reader_task = asyncio.current_task()
        try:
            await self._read_loop(reader)
        finally:
            writer.close()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        framer = LineFramer(self._max)
        reason = "worker closed the connection"
        try:
            while data := await reader.read(_READ_SIZE):
                for item in framer.feed(data):
                    self._dispatch_line(item)
                # read() does not yield while the stream has buffered data, and a flooding worker keeps it full:
                # give the loop (the API, /health, other sessions) a turn after each chunk.
                await asyncio.sleep(0)
        except (ConnectionError, OSError) as exc:
            reason = f"worker connection failed: {exc}"
        except Exception as exc:  # a bug here must not leave a running task waiting out its timeout
            logger.exception("worker socket %s: reading from the worker failed", self.socket_path)
            reason = f"gpud could not read from the worker: {exc}"
        finally:
            # Always: whatever ended the loop (even cancellation), the running task learns at once.
            self._mark_gone(reason)

    def _dispatch_line(self, item: bytes | ProtocolError) -> None:
        try:
            if isinstance(item, ProtocolError):
                raise item
            running = self._running
            delta = None if running is None else decode_delta(item, running.delta_prefix)
            if running is not None and delta is not None:  # the common message, read without a whole object
                self._on_task_event(WorkerMessage.TEXT_DELTA.value, {"task_id": running.task_id, "delta": delta})
                return
            message = decode(item, max_size=self._max)
            self._dispatch(message)
        except ProtocolError as exc:
            self._protocol_error(str(exc))
        except Exception as exc:  # fields of an unexpected type (e.g. an unhashable ping id): skip the message
            self._protocol_error(f"message could not be handled: {type(exc).__name__}: {exc}")

    def _protocol_error(self, problem: str) -> None:
        # A broken message is skipped, not fatal: the worker may still finish its task. The running task's
        # consumer sees it as a log line so the client learns why output may be missing.
        self.protocol_errors += 1
        problem = problem[:_PROBLEM_CHARS]
        if self.protocol_errors <= _LOGGED_PROTOCOL_ERRORS:
            logger.warning("worker socket %s: protocol error: %s", self.socket_path, problem)
            if self.protocol_errors == _LOGGED_PROTOCOL_ERRORS:
                logger.warning("worker socket %s: further protocol errors are counted, not logged", self.socket_path)
        if self._running is not None:
            data = {"stream": "gpud", "line": f"worker protocol error: {problem}"}
            self._running.deliver(WorkerEvent(WorkerMessage.LOG, self._running.task_id, data))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.pop("type")
        if kind in _TASK_EVENTS and (kind != WorkerMessage.ERROR or "task_id" in message):  # most messages
            self._on_task_event(kind, message)
        elif kind == WorkerMessage.HELLO:
            self._on_hello(message)
        elif kind == WorkerMessage.READY:
            self._on_ready(message)
        elif kind == WorkerMessage.PONG:
            future = self._pings.pop(message.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == WorkerMessage.ERROR:
            self._on_worker_error(message)
        else:
            logger.debug("worker socket %s: ignoring unknown message type %.40r", self.socket_path, kind)

    def _on_hello(self, message: dict[str, Any]) -> None:
        self._hello = message
        version = message.get("protocol")
        if version != PROTOCOL_VERSION:
            problem = f"worker speaks protocol {version!r:.40}, gpud speaks {PROTOCOL_VERSION}"
            self._send_nowait({"type": HostMessage.SHUTDOWN, "reason": problem})
            self._fail_ready(WorkerSetupFailed(problem))

    def _on_ready(self, message: dict[str, Any]) -> None:
        info = message.get("info")
        ready = ReadyInfo(
            protocol=int(self._hello.get("protocol", PROTOCOL_VERSION)),
            pid=self._hello.get("pid"),
            info=info if isinstance(info, dict) else {},
            seconds_to_ready=time.monotonic() - self._started_at,
            resumed=self._hello.get("resuming") is True and message.get("resumed") is True,
        )
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(ready)

    def _on_worker_error(self, message: dict[str, Any]) -> None:
        text = str(message.get("message", "worker error"))[:_ERROR_CHARS]  # quoted in gpud's log and errors
        if self._ready is not None and not self._ready.done():
            self._fail_ready(WorkerSetupFailed(text))
        else:
            logger.warning("worker socket %s: worker error: %s", self.socket_path, text)

    def _on_task_event(self, kind: str, message: dict[str, Any]) -> None:
        running = self._running
        task_id = message.get("task_id")
        if running is None or task_id != running.task_id:
            logger.debug("worker socket %s: dropping %s for task %r", self.socket_path, kind, task_id)
            return
        if kind == WorkerMessage.DONE:
            self._running = None  # the worker is free again as soon as it says so
        running.deliver(WorkerEvent(kind, running.task_id, message))

    def _fail_ready(self, error: WorkerError) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # mark retrieved: nobody may be waiting yet

    def _mark_gone(self, reason: str) -> None:
        if self._gone is not None:
            return
        self._gone = WorkerGone(reason)
        self._connected.set()
        self._fail_ready(WorkerGone(reason))
        if self._running is not None:
            running, self._running = self._running, None
            running.deliver(WorkerGone(f"{reason} while running task {running.task_id}"))
        for future in self._pings.values():
            if not future.done():
                future.set_exception(WorkerGone(reason))
        self._pings.clear()

    def _send_nowait(self, message: dict[str, Any]) -> None:
        if self._gone is not None:
            raise self._gone
        if self._writer is None:
            raise WorkerError("no worker is connected")
        self._writer.write(encode(message, max_size=self._max))

    async def _send(self, message: dict[str, Any]) -> None:
        self._send_nowait(message)
        assert self._writer is not None
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise WorkerGone(f"worker connection failed: {exc}") from exc

    async def wait_ready(self, timeout: float) -> ReadyInfo:
        """Wait until the worker connects and says `ready`; raises WorkerTimeout, WorkerGone, WorkerSetupFailed."""
        if self._ready is None:
            raise WorkerError("channel not started")
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise WorkerTimeout(f"worker not ready within {timeout:g}s") from None

    def start_task(self, task_id: str, input: dict[str, Any], sink: EventSink) -> TaskStream:
        """Send a task now, from the caller's own step; its events go to `sink` as they are read, the last one
        `done`, or a WorkerError (WorkerGone, WorkerBusy, not ready) instead. Nothing is awaited: a task message
        is bounded by the request size, and sending it from the submitting request saves the loop turns a
        coroutine would take to get there."""
        stream = TaskStream(task_id, delta_prefix(task_id), sink)
        problem: WorkerError | None = None
        if self._ready is None or not self._ready.done() or self._ready.exception() is not None:
            problem = WorkerError("worker is not ready")
        elif self._running is not None:
            problem = WorkerBusy(f"worker is running task {self._running.task_id}")
        else:
            try:
                self._send_nowait({"type": HostMessage.TASK, "task_id": task_id, "input": input})
                self._running = stream
            except WorkerError as exc:
                problem = exc
        if problem is not None:
            stream.deliver(problem)
            stream.abandoned = True
        return stream

    def abandon(self, stream: TaskStream) -> None:
        """Stop delivering a task's events: the worker stays busy with it until it says `done`."""
        stream.abandoned = True
        if self._running is stream and self._gone is not None:
            self._running = None

    async def run_task(self, task_id: str, input: dict[str, Any]) -> AsyncGenerator[WorkerEvent, None]:
        """Send a task and yield its events; the last one yielded is `done`. Raises WorkerGone, WorkerBusy."""
        queue: asyncio.Queue[WorkerEvent | WorkerError] = asyncio.Queue()
        stream = self.start_task(task_id, input, queue.put_nowait)
        try:
            while True:
                # get_nowait while there is something: Queue.get is a coroutine per item.
                item = queue.get_nowait() if queue.qsize() else await queue.get()
                if isinstance(item, WorkerError):
                    raise item
                yield item
                if item.type == WorkerMessage.DONE:
                    return
        finally:
            self.abandon(stream)

    async def cancel(self, task_id: str) -> None:
        """Ask the worker to stop a task; it answers with `done` (cancelled) if it complies. No-op if idle."""
        if self._running is None or self._running.task_id != task_id or self._gone is not None:
            return
        await self._send({"type": HostMessage.CANCEL, "task_id": task_id})

    async def ping(self, timeout: float) -> float:
        """Round-trip a ping; return the seconds it took. Raises WorkerTimeout or WorkerGone."""
        await self._connected_or_raise(timeout)
        ping_id = next(self._ping_ids)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        start = time.monotonic()
        try:
            await self._send({"type": HostMessage.PING, "id": ping_id})
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise WorkerTimeout(f"no pong within {timeout:g}s") from None
        finally:
            self._pings.pop(ping_id, None)
        return time.monotonic() - start

    async def _connected_or_raise(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise WorkerTimeout(f"worker did not connect within {timeout:g}s") from None
        if self._gone is not None:
            raise self._gone

    async def shutdown(self) -> None:
        """Ask the worker to exit (it cancels its task first); best effort, the runtime kills it anyway."""
        with contextlib.suppress(WorkerError, ConnectionError):
            await self._send({"type": HostMessage.SHUTDOWN})

    async def close(self) -> None:
        """Stop listening, drop the connection, and remove the socket file."""
        if self._server is not None:
            self._server.close()
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader_task, 2.0)
        self._mark_gone("channel closed")
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
