"""The admin API over gpud's Unix socket (gpuctl.unixhttp, stdlib only: fast startup), plus SSE with resume.

Everything here is synchronous: a CLI does one thing at a time, and aiohttp would cost a large import.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gpuctl import unixhttp
from gpuctl.trust import untrusted_reason
from gpuctl.unixhttp import ConnectFailed, Response, quote_segment

DEFAULT_SOCKET = "/run/gpud/gpud.sock"
# Requests that do real work on the daemon (model fetch, kill) may take long; plain reads are quick.
DEFAULT_TIMEOUT = 60.0
# How often a broken event stream is re-opened (with Last-Event-ID) before gpuctl gives up.
RESUME_ATTEMPTS = 5
RESUME_BACKOFF = 0.2


@dataclass(frozen=True)
class SocketChoice:
    """Which admin socket gpuctl talks to, and why (flag, environment, default, or dev fallback)."""

    path: str
    source: str


def dev_socket(environ: Mapping[str, str]) -> str:
    """Where `gpud run --dev` puts its admin socket for the current user."""
    runtime_dir = environ.get("XDG_RUNTIME_DIR") or f"/tmp/gpud-{os.getuid()}"
    return os.path.join(runtime_dir, "gpud", "gpud.sock")


def resolve_socket(flag: str | None, environ: Mapping[str, str]) -> SocketChoice:
    """--socket, else GPUD_SOCKET, else the default; the dev socket only when the default is absent and it exists."""
    if flag:
        return SocketChoice(flag, "--socket")
    if environ.get("GPUD_SOCKET"):
        return SocketChoice(environ["GPUD_SOCKET"], "GPUD_SOCKET")
    if not os.path.exists(DEFAULT_SOCKET):
        dev = dev_socket(environ)
        if os.path.exists(dev):
            return SocketChoice(dev, "dev")
    return SocketChoice(DEFAULT_SOCKET, "default")


class ClientError(Exception):
    """Base of everything gpuctl's client raises."""


class Unreachable(ClientError):
    """The socket cannot be used: gpud is not running there, or this user may not connect."""

    def __init__(self, path: str, reason: str, *, permission: bool = False) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.permission = permission


class UntrustedSocket(ClientError):
    """The socket, or a directory above it, could be another user's: gpuctl will not talk to it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ApiError(ClientError):
    """The daemon answered with an error body `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class StreamLost(ClientError):
    """An event stream broke and could not be resumed."""


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event: its id, type, and JSON data."""

    id: int | None
    event: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The stable `-o json` shape of one event."""
        return {"id": self.id, "event": self.event, "data": self.data}


def _unreachable(path: str, exc: OSError) -> Unreachable:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Unreachable(path, "permission denied", permission=True)
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
        return Unreachable(path, "no daemon is listening here")
    return Unreachable(path, exc.strerror or str(exc))


def parse_sse(lines: Iterable[bytes]) -> Iterator[SseEvent]:
    """Events from raw SSE lines (comments ignored), each yielded as soon as its blank line arrives."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield _event(fields, data)
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue  # heartbeat comment
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        else:
            fields[name] = value


def _event(fields: Mapping[str, str], data: list[str]) -> SseEvent:
    raw_id = fields.get("id", "")
    try:
        payload = json.loads("\n".join(data))
    except ValueError:
        payload = {"raw": "\n".join(data)}
    return SseEvent(
        id=int(raw_id) if raw_id.isdigit() else None,
        event=fields.get("event", "message"),
        data=payload if isinstance(payload, dict) else {"value": payload},
    )


class Client:
    """The admin API of one gpud, over its Unix socket."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: Any = None, *, accept: tuple[int, ...] = (), long: bool = False
    ) -> Any:
        """One JSON request; the parsed body (None for 204). Errors not in `accept` raise ApiError; long: no timeout."""
        response = self._send(method, path, body, {}, None if long else self.timeout)
        try:
            raw = response.read()
        except OSError as exc:
            raise Unreachable(self.socket_path, f"connection broke: {exc}") from None
        finally:
            response.close()
        if response.status >= 400 and response.status not in accept:
            raise _api_error(response, raw)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", errors="replace")

    def get(self, path: str, **query: Any) -> Any:
        """GET a JSON route."""
        return self.request("GET", _with_query(path, query))

    def post(self, path: str, body: Any = None, *, long: bool = False) -> Any:
        """POST to a JSON route (long: wait as long as the daemon takes)."""
        return self.request("POST", path, body, long=long)

    def delete(self, path: str) -> Any:
        """DELETE a resource."""
        return self.request("DELETE", path)

    def stream(self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None) -> Response:
        """Open a streaming response (no read timeout: streams may idle between heartbeats); errors raise ApiError."""
        response = self._send(method, path, body, dict(headers or {}), None)
        if response.status >= 400:
            try:
                raw = response.read()
            except OSError:
                raw = b""
            finally:
                response.close()
            raise _api_error(response, raw)
        return response

    def submit(self, body: Mapping[str, Any]) -> Iterator[SseEvent]:
        """Submit a task and yield its events until task_finish, resuming the stream if it breaks."""
        return self._follow(lambda: self.stream("POST", "/api/tasks/submit", body), None, 0)

    def events(self, task_id: str, after_id: int = 0) -> Iterator[SseEvent]:
        """A task's events after `after_id` until task_finish (replayed, then live), resuming if the stream breaks."""
        quoted = quote_segment(task_id)
        return self._follow(lambda: self._events_stream(quoted, after_id), quoted, after_id)

    def log_lines(self, session_id: str, *, follow: bool, tail: int | None) -> Iterator[dict[str, Any]]:
        """A session worker's log lines as {stream, line}; with follow, until the worker ends."""
        query: dict[str, Any] = {"format": "ndjson", "follow": "1" if follow else "0", "tail": tail}
        path = _with_query(f"/api/sessions/{quote_segment(session_id)}/logs", query)
        response = self.stream("GET", path)
        try:
            for raw in response.lines():
                if raw.strip():
                    yield json.loads(raw)
        except OSError as exc:
            raise StreamLost(f"the log stream broke: {exc}") from None
        finally:
            response.close()

    def _events_stream(self, quoted_id: str, after_id: int) -> Response:
        return self.stream("GET", f"/api/tasks/{quoted_id}/events", headers={"Last-Event-ID": str(after_id)})

    def _follow(self, open_first: Callable[[], Response], task_id: str | None, after_id: int) -> Iterator[SseEvent]:
        """Yield events; if the stream ends early, re-open /events with Last-Event-ID: nothing repeats or is lost."""
        last_id, failures = after_id, 0
        response: Response | None = open_first()
        while True:
            if response is not None:
                try:
                    for event in parse_sse(response.lines()):
                        if event.id is not None:
                            last_id, failures = event.id, 0
                        task_id = task_id or _task_id(event)
                        yield event
                        if event.event == "task_finish":
                            return
                except OSError:
                    pass  # the connection broke: resume below
                finally:
                    response.close()
            failures += 1
            if task_id is None or failures > RESUME_ATTEMPTS:
                raise StreamLost(f"the event stream ended before task_finish (last event id {last_id})")
            time.sleep(RESUME_BACKOFF * failures)
            try:
                response = self._events_stream(task_id, last_id)
            except Unreachable:
                response = None  # the daemon may be restarting: try again

    def _send(self, method: str, path: str, body: Any, headers: dict[str, str], timeout: float | None) -> Response:
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if reason := untrusted_reason(self.socket_path):
            raise UntrustedSocket(self.socket_path, reason)
        try:
            return unixhttp.request(self.socket_path, method, path, body=payload, headers=headers, timeout=timeout)
        except ConnectFailed as exc:
            raise _unreachable(self.socket_path, exc) from None
        except OSError as exc:
            raise Unreachable(self.socket_path, f"connection broke: {exc}") from None


def _task_id(event: SseEvent) -> str | None:
    value = event.data.get("task_id")
    return quote_segment(value) if isinstance(value, str) and value else None


def _with_query(path: str, query: Mapping[str, Any]) -> str:
    present = {key: value for key, value in query.items() if value is not None}
    if not present:
        return path
    import urllib.parse  # only for the few commands with a query string (it is a start-up cost otherwise)

    return f"{path}?{urllib.parse.urlencode(present)}"


def _api_error(response: Response, raw: bytes) -> ApiError:
    """The daemon's error body, or a generic one for anything that is not gpud's shape."""
    try:
        error = json.loads(raw)["error"]
        return ApiError(response.status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", errors="replace").strip()[:200]
        return ApiError(response.status, f"http_{response.status}", text or response.reason or "error")
