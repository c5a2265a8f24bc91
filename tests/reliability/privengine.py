"""A private engine API a test may stop and start again, leaving the shared test engines alone.

Podman: a second `podman system service` on its own socket, over the same storage as the shared one (containers run
under conmon, so stopping the service stops no container). Docker: a second dockerd with its own data and exec
roots and `--live-restore` (without it, stopping dockerd stops its containers), given the worker image from the
shared engine. Both are started as scripts/engines.sh starts the shared ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.daemonproc import UnixHTTPConnection
from tests.waiting import wait_for

WORKER_IMAGE = "gpud-worker-python:latest"


def answers(socket: str) -> bool:
    """Whether an engine API answers /_ping on this socket now."""
    if not os.path.exists(socket):
        return False
    conn = UnixHTTPConnection(socket, timeout=2.0)
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class PrivateEngine:
    """One engine process of this test's own, on a socket under a short temporary directory."""

    name = ""

    def __init__(self) -> None:
        # Short: the socket path must fit AF_UNIX's 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix=f"gpe-{self.name}-", dir="/tmp"))
        self.socket = str(self.dir / f"{self.name}.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        """The engine's command line."""
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> float:
        """Start the engine on the socket (again); seconds until it answers."""
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.starts += 1
        started = time.monotonic()
        with open(self.dir / f"{self.name}-{self.starts}.log", "wb") as log:
            # Its own session, so a test's signals never reach it; its cwd keeps conmon's `oom` files out of the repo.
            self.proc = subprocess.Popen(
                self.command(), cwd=self.dir, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        wait_for(lambda: answers(self.socket), f"{self.name} answering on {self.socket}", timeout, interval=0.1)
        return time.monotonic() - started

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM the engine (only its own process: containers and their monitors stay), SIGKILL if it lingers;
        seconds until it had exited."""
        started = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - started

    def close(self) -> None:
        """Stop the engine and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePodman(PrivateEngine):
    """`podman system service --time=0` on its own socket, with the tests' CONTAINERS_CONF."""

    name = "podman"

    def command(self) -> list[str]:
        """As scripts/engines.sh starts the shared service."""
        return ["podman", "system", "service", "--time=0", f"unix://{self.socket}"]


class PrivateDocker(PrivateEngine):
    """dockerd with --live-restore and its own roots (its containerd keeps the containers while it is away)."""

    name = "docker"

    def command(self) -> list[str]:
        """As scripts/engines.sh starts the shared one, plus --live-restore."""
        return [
            "dockerd",
            "--host",
            f"unix://{self.socket}",
            "--data-root",
            str(self.dir / "data"),
            "--exec-root",
            str(self.dir / "exec"),
            "--pidfile",
            str(self.dir / "docker.pid"),
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--default-ulimit",
            "nofile=1024:1024",
            "--default-ulimit",
            "nproc=1024:1024",
            "--live-restore",
        ]

    def close(self) -> None:
        """Stop dockerd, undo the mount it makes of its data root onto itself (it leaves it), delete its files."""
        self.stop()
        # A bind mount on the same file system, which os.path.ismount does not see: umount says if there is none.
        subprocess.run(["umount", str(self.dir / "data")], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def load_image(self, shared_socket: str) -> None:
        """Copy the worker image from the shared engine into this one."""
        save = subprocess.Popen(
            ["docker", "-H", f"unix://{shared_socket}", "save", WORKER_IMAGE], stdout=subprocess.PIPE
        )
        load = ["docker", "-H", f"unix://{self.socket}", "load"]
        subprocess.run(load, stdin=save.stdout, check=True, capture_output=True)
        assert save.wait() == 0, "docker save of the worker image failed"
