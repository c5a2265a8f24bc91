"""gpud worker SDK: write setup() and predict(), call serve(). Standard library only, one self-contained file.

gpud bind-mounts this file read-only into session containers as /opt/gpud/lib/gpud_worker.py and sets
PYTHONPATH=/opt/gpud/lib, so a worker does `import gpud_worker`. The protocol is docs/worker-protocol.md.

    import gpud_worker

    class Echo:
        def setup(self):                      # runs once, before `ready`: load the model here
            self.prefix = "echo: "
        def predict(self, input, ctx):        # runs per task, in a thread; yield text pieces
            for word in input.get("prompt", "").split():
                if ctx.cancelled:
                    break
                yield self.prefix + word

    if __name__ == "__main__":
        gpud_worker.serve(Echo)

With GPUD_WORKER_SOCKET set, serve() speaks the protocol (session mode). Without it, serve() runs one task from
the JSON file GPUD_TASK_INPUT_FILE names, prints the text to stdout as it comes, and exits 0 or 1.

In session mode, when the connection ends without gpud's `shutdown` (gpud itself was killed or restarted), the
worker stops its task, keeps its loaded model and reconnects to the same socket path for
GPUD_WORKER_RECONNECT_SECONDS (default 60; 0: exit at once), then says hello with `resuming: true` and ready
again with its first ready info; it exits 0 if gpud does not come back in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

PROTOCOL_VERSION = 1
MAX_MESSAGE_SIZE = 4 * 1024 * 1024
SDK_NAME = "gpud-python/1"
DEFAULT_RECONNECT_SECONDS = 60.0
# Deltas are split so one message stays far below the limit even if every character needs a 6-byte escape.
_DELTA_CHARS = MAX_MESSAGE_SIZE // 8


class Context:
    """Per-task handle given to predict(): logging, progress, results, and the cancel flag."""

    def __init__(self, task_id: str, send: Callable[[dict[str, Any]], None]) -> None:
        self.task_id = task_id
        self._send = send
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        """True once gpud asked to cancel this task; long loops should check it and stop."""
        return self._cancel.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on cancel; return True if the task was cancelled."""
        return self._cancel.wait(seconds)

    def log(self, line: str, stream: str = "stderr") -> None:
        """Send one log line for this task (becomes a `logs` event for the client)."""
        self._send({"type": "log", "task_id": self.task_id, "stream": stream, "line": str(line)})

    def progress(self, done: float, total: float | None = None) -> None:
        """Report progress, e.g. steps done out of total."""
        self._send({"type": "progress", "task_id": self.task_id, "done": done, "total": total})

    def result(self, output: Any = None, **extra: Any) -> None:
        """Report a structured result (JSON-serializable) before the task ends."""
        message: dict[str, Any] = {"type": "result", "task_id": self.task_id, **extra}
        if output is not None:
            message["output"] = output
        self._send(message)

    def delta(self, text: str) -> None:
        """Stream a piece of text now (what yielding from predict() does)."""
        for start in range(0, len(text), _DELTA_CHARS):
            self._send({"type": "text_delta", "task_id": self.task_id, "delta": text[start : start + _DELTA_CHARS]})


# Made once: json.dumps with keywords builds a new encoder per call, a large part of a streamed delta's cost.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _encode(message: dict[str, Any]) -> bytes:
    return _ENCODER.encode(message).encode() + b"\n"


def _make_worker(worker: Any) -> Any:
    """Accept a class (instantiated with no arguments) or a ready instance."""
    return worker() if isinstance(worker, type) else worker


def _run_predict(worker: Any, input: dict[str, Any], ctx: Context) -> tuple[str, bool]:
    """Call predict and stream what it yields; return (full text, cancelled)."""
    output = worker.predict(input, ctx)
    if isinstance(output, str) or output is None:
        text = output or ""
        if text:
            ctx.delta(text)
        return text, ctx.cancelled
    pieces: list[str] = []
    iterator: Iterator[Any] = iter(output)
    try:
        for piece in iterator:
            if piece is not None and str(piece):
                pieces.append(str(piece))
                ctx.delta(str(piece))
            if ctx.cancelled:
                return "".join(pieces), True
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # runs the generator's finally blocks when it is stopped early
    return "".join(pieces), ctx.cancelled


class _Session:
    """Session mode: one connection to gpud at a time, tasks one at a time, predict in a worker thread."""

    def __init__(self, sock: socket.socket, worker: Any) -> None:
        self._sock = sock
        self._conn = 0  # which connection to gpud this is: a task only ever sends on the one it came on
        self._factory = worker
        self._worker: Any = None
        self._ready_info: dict[str, Any] = {}
        self._lock = threading.Lock()  # whole messages only: the reader thread and predict both send
        self._ctx: Context | None = None
        self._jobs: queue.SimpleQueue[tuple[Context, Any]] = queue.SimpleQueue()  # for the task thread
        self._idle = threading.Event()  # set while no task runs
        self._idle.set()
        self._runner: threading.Thread | None = None

    def send(self, message: dict[str, Any], conn: int | None = None) -> None:
        data = _encode(message)
        if len(data) > MAX_MESSAGE_SIZE:
            kind = message.get("type")
            data = _encode(
                {
                    "type": "log",
                    "task_id": message.get("task_id"),
                    "stream": "gpud",
                    "line": f"gpud_worker: dropped a {kind} message of {len(data)} bytes (limit {MAX_MESSAGE_SIZE})",
                }
            )
        with self._lock:
            if conn is not None and conn != self._conn:
                # A task of a connection that ended: the gpud now listening never sent it.
                raise BrokenPipeError("the connection this task came on is gone")
            self._sock.sendall(data)

    def _hello(self, resuming: bool = False) -> None:
        hello: dict[str, Any] = {"type": "hello", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "sdk": SDK_NAME}
        if resuming:
            hello["resuming"] = True
        self.send(hello)

    def run(self) -> int | None:
        """Say hello, load, say ready, serve; the exit code, or None when gpud went away without `shutdown`."""
        self._hello()
        started = time.monotonic()
        try:
            self._worker = _make_worker(self._factory)
            info = self._worker.setup() if hasattr(self._worker, "setup") else None
        except Exception as exc:
            traceback.print_exc()
            self.send({"type": "error", "code": "setup_failed", "message": f"{type(exc).__name__}: {exc}"})
            return 1
        self._ready_info = dict(info) if isinstance(info, dict) else {}
        self._ready_info.setdefault("load_seconds", round(time.monotonic() - started, 6))
        try:
            self.send({"type": "ready", "info": self._ready_info})
        except OSError:
            return None  # gpud went away while the model loaded: it is loaded now, keep it
        return self._serve()

    def resume(self, sock: socket.socket) -> int | None:
        """Serve again on a new connection to a restarted gpud, with the model loaded before (no second setup)."""
        with self._lock:
            self._sock = sock
            self._conn += 1
        try:
            self._hello(resuming=True)
            self.send({"type": "ready", "info": self._ready_info, "resumed": True})
        except OSError:
            return None
        return self._serve()

    def _serve(self) -> int | None:
        try:
            shutdown = self._read_loop()
        except OSError:  # a pong or an error could not be sent: the connection is gone
            shutdown = False
        self._stop_current()  # gpud asked, or is gone: either way nobody waits for this task any more
        return 0 if shutdown else None

    def _read_loop(self) -> bool:
        """Handle gpud's messages; True when gpud said `shutdown`, False when the connection ended."""
        buf = b""
        while True:
            try:
                data = self._sock.recv(256 * 1024)
            except OSError:
                data = b""
            if not data:
                return False
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if self._handle_line(line) is False:
                    return True
            if len(buf) > MAX_MESSAGE_SIZE:
                buf = b""
                self.send({"type": "error", "code": "protocol_error", "message": "message from gpud too large"})

    def _handle_line(self, line: bytes) -> bool:
        """Handle one message from gpud; False means shut down."""
        try:
            message = json.loads(line)
            kind = message["type"]
        except (ValueError, TypeError, KeyError) as exc:
            self.send({"type": "error", "code": "protocol_error", "message": f"bad message from gpud: {exc}"})
            return True
        if kind == "ping":
            self.send({"type": "pong", "id": message.get("id")})
        elif kind == "task":
            self._start_task(str(message.get("task_id")), message.get("input") or {})
        elif kind == "cancel":
            ctx = self._ctx
            if ctx is not None and ctx.task_id == message.get("task_id"):
                ctx._cancel.set()
        elif kind == "shutdown":
            return False
        return True  # unknown types are ignored, so gpud may add messages without a version bump

    def _start_task(self, task_id: str, input: Any) -> None:
        # gpud sends a task only after the previous one's `done`, so that task is just returning: a new task
        # arriving in that instant must wait for it, not be refused as busy.
        if not self._idle.wait(5.0):
            self.send({"type": "error", "task_id": task_id, "code": "busy", "message": "a task is running"})
            self.send({"type": "done", "task_id": task_id, "status": "failed"})
            return
        conn = self._conn
        ctx = Context(task_id, lambda message: self.send(message, conn))
        self._ctx = ctx
        self._idle.clear()
        if self._runner is None:  # one thread for the session's life: a new thread per task cost each a start-up
            self._runner = threading.Thread(target=self._run_tasks, name="gpud-task", daemon=True)
            self._runner.start()
        self._jobs.put((ctx, input))

    def _run_tasks(self) -> None:
        while True:
            ctx, input = self._jobs.get()
            try:
                self._task_thread(ctx, input)
            finally:
                self._idle.set()

    def _task_thread(self, ctx: Context, input: Any) -> None:
        # OSError anywhere here means gpud is gone (the reader loop notices the closed socket), or its connection
        # is: every message of the task goes through ctx, bound to the connection the task came on.
        with contextlib.suppress(OSError):
            status = self._predict_and_report(ctx, input)
            ctx._send({"type": "done", "task_id": ctx.task_id, "status": status})

    def _predict_and_report(self, ctx: Context, input: Any) -> str:
        """Run predict, send `text` or `error`; return the `done` status."""
        try:
            text, cancelled = _run_predict(self._worker, input if isinstance(input, dict) else {"input": input}, ctx)
        except OSError:
            raise
        except Exception as exc:
            traceback.print_exc()
            code = type(exc).__name__
            ctx._send({"type": "error", "task_id": ctx.task_id, "code": code, "message": str(exc) or code})
            return "cancelled" if ctx.cancelled else "failed"
        if cancelled:
            return "cancelled"
        ctx._send({"type": "text", "task_id": ctx.task_id, "text": text})
        return "completed"

    def _stop_current(self) -> None:
        ctx = self._ctx
        if ctx is not None and not self._idle.is_set():
            ctx._cancel.set()
            self._idle.wait(5.0)


def _connect(path: str, timeout: float) -> socket.socket:
    """Connect to gpud's socket, retrying while it is not there yet."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def read_task_input() -> dict[str, Any]:
    """One-off input: the JSON file named by GPUD_TASK_INPUT_FILE (readable by this worker's uid only), else {}."""
    path = os.environ.get("GPUD_TASK_INPUT_FILE")
    raw = ""
    if path:
        with open(path, encoding="utf-8") as fh:
            raw = fh.read()
    value = json.loads(raw) if raw.strip() else {}
    return value if isinstance(value, dict) else {"input": value}


def run_oneoff(worker: Any) -> int:
    """Run one task without gpud's socket: text to stdout as it comes, logs to stderr; return the exit code."""

    def send(message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "text_delta":
            sys.stdout.write(message["delta"])
            sys.stdout.flush()
        elif kind == "log":
            print(message["line"], file=sys.stderr, flush=True)
        elif kind in ("result", "progress"):
            print(json.dumps({k: v for k, v in message.items() if k != "task_id"}), file=sys.stderr, flush=True)

    try:
        input = read_task_input()
        instance = _make_worker(worker)
        if hasattr(instance, "setup"):
            instance.setup()
        text, _ = _run_predict(instance, input, Context("oneoff", send))
    except Exception:
        traceback.print_exc()
        return 1
    if text and not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def run_session(worker: Any, socket_path: str, connect_timeout: float = 60.0, reconnect_seconds: float = 0.0) -> int:
    """Connect to gpud at socket_path, load, serve tasks until gpud says shutdown; return the exit code. When the
    connection ends without `shutdown`, keep the model and reconnect for up to reconnect_seconds (0: exit 0)."""
    sock = _connect(socket_path, connect_timeout)
    session = _Session(sock, worker)
    try:
        code = session.run()
        while code is None:
            sock.close()
            if reconnect_seconds <= 0:
                return 0
            try:
                sock = _connect(socket_path, reconnect_seconds)
            except OSError:
                print(f"gpud_worker: gpud did not come back within {reconnect_seconds:g}s", file=sys.stderr)
                return 0
            code = session.resume(sock)
        return code
    finally:
        sock.close()


def _env_seconds(name: str, default: float) -> float:
    """A non-negative number of seconds from the environment; the default when unset or not such a number."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < float("inf"):
        print(f"gpud_worker: ignoring {name}={value!r} (not a number of seconds); using {default:g}", file=sys.stderr)
        return default
    return seconds


def serve(worker: Any) -> NoReturn:
    """Run `worker` (a class or an instance with setup()/predict()) under gpud, then exit the process."""
    path = os.environ.get("GPUD_WORKER_SOCKET")
    if path:
        timeout = _env_seconds("GPUD_WORKER_CONNECT_TIMEOUT", 60.0)
        reconnect = _env_seconds("GPUD_WORKER_RECONNECT_SECONDS", DEFAULT_RECONNECT_SECONDS)
        sys.exit(run_session(worker, path, timeout, reconnect))
    sys.exit(run_oneoff(worker))


__all__ = ["Context", "read_task_input", "run_oneoff", "run_session", "serve"]
