"""Wire format between gpud and a worker: newline-delimited JSON objects over a Unix stream socket.

The language-neutral specification is docs/worker-protocol.md; this module is its host-side implementation
(gpud/worker/sdk.py carries its own stdlib copy, because it must run inside containers without gpud).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any

from gpud.jsonsafe import UnsafeJSON, clean_text, loads_strict

# Bumped only for incompatible changes; additive fields and new message types keep the version.
PROTOCOL_VERSION = 1
# One message (JSON plus the trailing newline) may not exceed this many bytes, in either direction.
MAX_MESSAGE_SIZE = 4 * 1024 * 1024

# Where things live inside a session container (the runtime bind-mounts them there).
CONTAINER_SOCKET_DIR = "/run/gpud-worker"
SOCKET_NAME = "worker.sock"
CONTAINER_SOCKET_PATH = f"{CONTAINER_SOCKET_DIR}/{SOCKET_NAME}"
CONTAINER_SDK_DIR = "/opt/gpud/lib"
CONTAINER_SDK_PATH = f"{CONTAINER_SDK_DIR}/gpud_worker.py"

# Environment variables a worker reads.
ENV_SOCKET = "GPUD_WORKER_SOCKET"
ENV_TASK_INPUT_FILE = "GPUD_TASK_INPUT_FILE"
ENV_CONNECT_TIMEOUT = "GPUD_WORKER_CONNECT_TIMEOUT"
# Seconds a session worker whose connection ended without `shutdown` keeps its model and tries to reconnect.
ENV_RECONNECT_SECONDS = "GPUD_WORKER_RECONNECT_SECONDS"
DEFAULT_RECONNECT_SECONDS = 60.0


class HostMessage(enum.StrEnum):
    """Messages gpud sends to a worker."""

    TASK = "task"
    CANCEL = "cancel"
    PING = "ping"
    SHUTDOWN = "shutdown"


class WorkerMessage(enum.StrEnum):
    """Messages a worker sends to gpud."""

    HELLO = "hello"
    READY = "ready"
    TEXT_DELTA = "text_delta"
    TEXT = "text"
    LOG = "log"
    PROGRESS = "progress"
    RESULT = "result"
    ERROR = "error"
    DONE = "done"
    PONG = "pong"


class TaskStatus(enum.StrEnum):
    """The `status` of a `done` message."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ProtocolError(Exception):
    """A message that breaks the wire format (bad JSON, not an object, no type, too large)."""


def encode(message: Mapping[str, Any], *, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """One message as a line of compact UTF-8 JSON; raises ProtocolError if it is malformed or too large."""
    if not isinstance(message.get("type"), str):
        raise ProtocolError("a message needs a string 'type' field")
    try:
        # JSON escapes every control character, so a newline can never appear inside the encoded object.
        line = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message of type {message['type']!r} is not JSON-serializable: {exc}") from exc
    if len(line) + 1 > max_size:
        raise ProtocolError(f"message of type {message['type']!r} is {len(line) + 1} bytes, over {max_size}")
    return line + b"\n"


def decode(line: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> dict[str, Any]:
    """Parse one line (with or without its newline) into a message dict; raises ProtocolError."""
    if len(line) > max_size:
        raise ProtocolError(f"message is {len(line)} bytes, over {max_size}")
    try:
        # Strict: NaN/Infinity, numbers out of range and nesting deeper than 64 are refused (and RecursionError
        # or the integer digit limit cannot escape); lone surrogates in strings become U+FFFD.
        message = loads_strict(line, clean_strings=True)
    except UnsafeJSON as exc:
        raise ProtocolError(f"message is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(message).__name__}")
    if not isinstance(message.get("type"), str):
        raise ProtocolError("message has no string 'type' field")
    return message


def delta_prefix(task_id: str) -> bytes:
    """How a text_delta of `task_id` begins when written as the SDK writes it (compact, keys in this order)."""
    return b'{"type":"text_delta","task_id":%s,"delta":"' % json.dumps(task_id).encode()


def decode_delta(line: bytes, prefix: bytes) -> str | None:
    """The delta of a line that is exactly `prefix` + a JSON string's rest + `}` (what a streaming worker sends
    most), with lone surrogates replaced as decode() does; None for any other line (decode() then judges it).

    The string is read by the json module's own string scanner, so it is held to what decode() would accept; the
    rest of the line is fixed bytes. This skips building and checking a whole object per delta."""
    if not (line.startswith(prefix) and line.endswith(b'"}')):
        return None
    try:
        text = line.decode("utf-8", "surrogatepass")  # as json.loads decodes UTF-8
        delta, end = json.decoder.scanstring(text, len(prefix))  # type: ignore[attr-defined]
    except ValueError:  # not UTF-8 or not a valid string: decode() reports it
        return None
    return clean_text(delta) if end == len(text) - 1 else None


class LineFramer:
    """Splits a byte stream into lines, skipping (and reporting) any line longer than max_size."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._max = max_size
        self._buf = bytearray()
        self._skipping = False  # inside an oversized line: drop bytes until its newline

    def feed(self, data: bytes) -> list[bytes | ProtocolError]:
        """Add received bytes; return complete lines (without newline) and errors, in stream order."""
        out: list[bytes | ProtocolError] = []
        self._buf += data
        start = 0
        while True:
            nl = self._buf.find(b"\n", start)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False
            elif nl - start + 1 > self._max:
                out.append(ProtocolError(f"message is {nl - start + 1} bytes, over {self._max}"))
            else:
                out.append(bytes(self._buf[start:nl]))
            start = nl + 1
        del self._buf[:start]
        if len(self._buf) >= self._max:
            # The line in progress is already too large: report it once and drop it as it streams in.
            if not self._skipping:
                out.append(ProtocolError(f"message exceeds {self._max} bytes"))
            self._skipping = True
            self._buf.clear()
        return out

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held in the buffer."""
        return len(self._buf)
