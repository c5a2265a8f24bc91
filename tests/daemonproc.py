"""A real `gpud run` child process for tests, with its own notify socket, admin socket and TCP port."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.waiting import WaitTimeout, wait_for

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (the admin API)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        """Connect to the Unix socket instead of TCP."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class DaemonProcess:
    """Starts gpud with static GPUs 0:low,1:high; `env` adds or overrides variables."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.admin_socket = tmp / f"run-{self.port}" / "gpud.sock"
        self.notify_path = tmp / f"notify-{self.port}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)
        self.messages: list[str] = []
        self.stderr_path = tmp / f"gpud-{self.port}.log"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp),
            "GPUD_GPU_BACKEND": "static",
            "GPU_DEVICE_IDS": "0,1",
            "GPU_DEVICE_DIFFICULTY": "0:low,1:high",
            "GPUD_HTTP_LISTEN": f"127.0.0.1:{self.port}",
            "GPUD_ADMIN_SOCKET": str(self.admin_socket),
            "GPUD_STATE_DIR": str(tmp / "state"),
            "MODEL_CACHE_DIR": str(tmp / "models"),
            "GPUD_PRESETS_FILE": str(REPO / "gpud" / "settings" / "defaults" / "models.yaml"),
            "INTERNAL_API_KEY": "test-key",
            "NOTIFY_SOCKET": str(self.notify_path),
            "GPUD_RUNTIME": "process",
            **(env or {}),
        }
        self.env = {k: v for k, v in self.env.items() if v != ""}
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> DaemonProcess:
        """Spawn `python -m gpud run`; by default wait for READY=1."""
        with open(self.stderr_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpud", "run", *self.args],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=REPO,
            )
        if wait:
            self.wait_for_message("READY=1")
        return self

    @property
    def log(self) -> str:
        """What the daemon wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def wait_for_message(self, needle: str, timeout: float = 20.0) -> str:
        """Block until a notify datagram containing `needle` arrives (or has already); return that datagram."""

        def received() -> str | None:
            for message in self.messages:
                if needle in message:
                    return message
            try:
                message = self.notify.recv(4096).decode()  # waits up to the socket's 0.2 s time-out
            except TimeoutError:
                # Nothing queued: once gpud has exited, nothing more will come.
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(
                        f"gpud exited with {self.proc.returncode} before {needle!r}; got {self.messages}\n{self.log}"
                    ) from None
                return None
            self.messages.append(message)
            return message if needle in message else None

        try:
            return wait_for(received, f"a notify message with {needle!r}", timeout, interval=0)
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; got {self.messages}\n{self.log}") from None

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, admin: bool = False
    ) -> tuple[int, Any]:
        """One HTTP request to the public (TCP) or admin (Unix) API; returns (status, parsed JSON or text)."""
        conn: http.client.HTTPConnection = (
            UnixHTTPConnection(str(self.admin_socket)) if admin else http.client.HTTPConnection("127.0.0.1", self.port)
        )
        payload = json.dumps(body).encode() if body is not None else None
        try:
            conn.request(method, path, body=payload, headers=headers or {})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal to the daemon."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for exit; return the exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Stop the daemon if it still runs (SIGTERM, then SIGKILL), and close the notify socket."""
        if self.proc is not None:
            stop_process(self.proc)
        self.notify.close()


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Stop a process a test started, if it still runs: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
