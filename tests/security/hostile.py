"""A real gpud (process runtime) whose presets run hostile workers, an SSE reader, and a sampler that watches
the daemon's memory and /health latency while an attack runs. Used by test_output_bounds and test_hostile_input.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.daemonproc import REPO, DaemonProcess
from tests.security.procstat import rss_bytes

MODEL_ID = "hostile-model"
KEY = "test-key"
MiB = 1024 * 1024
HOSTILE_WORKERS = Path(__file__).resolve().parent / "workers"


def workers_dir(base: Path) -> Path:
    """The example and hostile workers copied to a world-readable directory (workers may run as another uid)."""
    copy = base / "workers"
    shutil.copytree(REPO / "examples" / "workers", copy, ignore=shutil.ignore_patterns("__pycache__"))
    for script in HOSTILE_WORKERS.glob("*.py"):
        shutil.copy(script, copy / script.name)
    for path in (copy, *copy.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


def presets_yaml(workers: Path) -> str:
    """hostile (session), flood (one-off), and the example stream (session) for the same model."""
    limits = "{memory: 1g, cpus: 1, pids: 64}"
    image = "gpud-worker-python:latest"
    return (
        "models:\n"
        f"  {MODEL_ID}:\n"
        f"    hostile: {{docker_image: '{image}', command: [python3, {workers}/hostile_session.py], mode: session,"
        f" readiness_timeout_seconds: 30, limits: {limits}}}\n"
        f"    flood: {{docker_image: '{image}', command: [python3, {workers}/hostile_oneoff.py], mode: oneoff,"
        f" limits: {limits}}}\n"
        f"    stream: {{docker_image: '{image}', command: [python3, {workers}/stream_text.py], mode: session,"
        f" readiness_timeout_seconds: 30, limits: {limits}}}\n"
    )


@dataclass
class Host:
    """A daemon and its base directory."""

    base: Path
    daemon: DaemonProcess

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def rss(self) -> int:
        """The daemon's resident memory now."""
        return rss_bytes(self.pid)

    def close(self) -> None:
        """Stop the daemon and remove the base directory."""
        self.daemon.kill()
        shutil.rmtree(self.base, ignore_errors=True)


def start_host(env: Mapping[str, str] | None = None) -> Host:
    """gpud with the process runtime, the presets above and a cached model."""
    base = Path(tempfile.mkdtemp(prefix="gsec-", dir="/var/tmp"))
    base.chmod(0o755)
    model_dir = base / "models" / MODEL_ID
    model_dir.mkdir(parents=True)
    (model_dir / "tokens.txt").write_text("alpha beta gamma\n")
    for path in (base / "models", model_dir):
        path.chmod(0o755)
    (model_dir / "tokens.txt").chmod(0o644)
    (base / "models.yaml").write_text(presets_yaml(workers_dir(base)))
    daemon = DaemonProcess(
        base,
        env={
            "GPUD_STATE_DIR": str(base / "state"),
            "MODEL_CACHE_DIR": str(base / "models"),
            "AUTO_FETCH_MODELS": "false",
            "GPUD_PRESETS_FILE": str(base / "models.yaml"),
            "ALLOWED_DOCKER_IMAGES": "gpud-worker-python:*",
            "INTERNAL_API_KEY": KEY,
            **(env or {}),
        },
    )
    try:
        daemon.start()
    except BaseException:
        daemon.kill()
        shutil.rmtree(base, ignore_errors=True)
        raise
    threading.Thread(target=_drain_notify, args=(daemon,), daemon=True).start()
    return Host(base, daemon)


def _drain_notify(daemon: DaemonProcess) -> None:
    """Read sd_notify datagrams (WATCHDOG=1 ...) so gpud's sends never block on a full queue."""
    while True:
        try:
            daemon.messages.append(daemon.notify.recv(4096).decode())
        except TimeoutError:
            continue
        except OSError:
            return


def body(preset: str, task_type: str = "session", **metadata: Any) -> dict[str, Any]:
    """A submission for the hostile model."""
    return {"task_type": task_type, "model_id": MODEL_ID, "task_preset": preset, "metadata": metadata}


@dataclass
class Frame:
    """One SSE event as read: id, type, its data's size, and the data (parsed)."""

    id: int
    event: str
    size: int
    data: dict[str, Any]


def parse_frames(buffer: bytearray) -> list[Frame]:
    """Complete frames at the front of `buffer` (removed from it); comments skipped."""
    frames = []
    while (end := buffer.find(b"\n\n")) >= 0:
        raw = bytes(buffer[:end])
        del buffer[: end + 2]
        fields: dict[str, bytes] = {}
        for part in raw.split(b"\n"):
            if part and not part.startswith(b":"):
                name, _, value = part.partition(b": ")
                fields[name.decode()] = value
        if "data" in fields:
            data = fields["data"]
            frames.append(Frame(int(fields["id"]), fields["event"].decode(), len(data), json.loads(data)))
    return frames


def read_stream(response: http.client.HTTPResponse) -> list[Frame]:
    """Every frame of an SSE response, to its end."""
    buffer = bytearray()
    frames: list[Frame] = []
    while chunk := response.read1(1 << 20):
        buffer += chunk
        frames += parse_frames(buffer)
    return frames


def submit(host: Host, submission: dict[str, Any], timeout: float = 300) -> list[Frame]:
    """POST a task and read its whole stream; asserts a 200."""
    conn = http.client.HTTPConnection("127.0.0.1", host.daemon.port, timeout=timeout)
    try:
        payload = json.dumps(submission).encode()
        conn.request("POST", "/api/tasks/submit", body=payload, headers={"X-API-Key": KEY})
        response = conn.getresponse()
        assert response.status == 200, response.read()[:2000]
        return read_stream(response)
    finally:
        conn.close()


def session_of(frames: list[Frame]) -> str | None:
    """The session a task's stream names."""
    return next((f.data["session_id"] for f in frames if f.data.get("session_id")), None)


def call(host: Host, method: str, path: str) -> tuple[int, Any]:
    """One JSON request with the key."""
    return host.daemon.request(method, path, headers={"X-API-Key": KEY})


def end_session(host: Host, frames: list[Frame]) -> None:
    """Kill the session a task ran on (its GPU is free again)."""
    session_id = session_of(frames)
    if session_id is not None:
        call(host, "DELETE", f"/api/sessions/{session_id}")


def raw_request(host: Host, raw: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """Send bytes as they are (any header, any body); the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", host.daemon.port), timeout=timeout) as sock:
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def post_raw(host: Host, payload: bytes, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """POST /api/tasks/submit with a raw body."""
    head = {"Host": "gpud", "X-API-Key": KEY, "Content-Type": "application/json", **(headers or {})}
    head["Content-Length"] = str(len(payload))
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return raw_request(host, f"POST /api/tasks/submit HTTP/1.1\r\n{lines}Connection: close\r\n\r\n".encode() + payload)


def health_latency(host: Host) -> float:
    """Seconds one GET /health takes."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", host.daemon.port, timeout=30)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
    finally:
        conn.close()
    return time.monotonic() - started


@dataclass
class Sampler:
    """Samples the daemon's RSS (every 50 ms) and /health latency (every 250 ms) in threads while active."""

    host: Host
    before: int = 0
    peak: int = 0
    latencies: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Sampler:
        self.before = self.peak = self.host.rss()
        self._threads = [
            threading.Thread(target=self._rss, daemon=True),
            threading.Thread(target=self._health, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(35)

    def _rss(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.host.rss())

    def _health(self) -> None:
        while not self._stop.wait(0.25):
            self.latencies.append(health_latency(self.host))

    @property
    def worst_latency(self) -> float:
        """The slowest /health answer seen (0 if none was sampled)."""
        return max(self.latencies, default=0.0)
