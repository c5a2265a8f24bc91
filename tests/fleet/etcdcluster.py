"""A real etcd cluster for tests: Debian's etcd-server, three members on loopback ports, data in a tmp dir.

Each member can be killed (SIGKILL) and started again on its data; the whole cluster stops at the end.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.daemonproc import free_port
from tests.waiting import wait_for


@dataclass
class Member:
    """One etcd member process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        """Its client URL (the gRPC gateway answers on it too)."""
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """Its peer URL."""
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    """Three (or `size`) members; start(), kill(member), restart(member), stop()."""

    base: Path
    size: int = 3
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        self.base.mkdir(parents=True, exist_ok=True)
        for index in range(self.size):
            name = f"m{index}"
            self.members.append(Member(name, free_port(), free_port(), self.base / name, self.base / f"{name}.log"))

    @property
    def endpoints(self) -> str:
        """GPUD_ETCD_ENDPOINTS for this cluster."""
        return ",".join(m.client_url for m in self.members)

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start_member(self, member: Member, state: str = "new") -> None:
        """Start one member (on its existing data after a kill)."""
        command = [
            "etcd",
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", self._initial_cluster(),
            "--initial-cluster-state", state,
            "--initial-cluster-token", f"gpud-test-{self.members[0].client_port}",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--log-level", "warn",
        ]  # fmt: skip
        with open(member.log_path, "ab") as log:
            member.proc = subprocess.Popen(command, stdout=log, stderr=log)

    def start(self) -> EtcdCluster:
        """Start every member and wait until the cluster has a leader."""
        for member in self.members:
            self.start_member(member)
        wait_for(self.healthy, "an etcd leader", timeout=30)
        return self

    def healthy(self, member: Member | None = None) -> bool:
        """Whether a member (any live one by default) answers a linearizable read."""
        for candidate in [member] if member else self.members:
            if candidate.proc is None or candidate.proc.poll() is not None:
                continue
            request = urllib.request.Request(
                candidate.client_url + "/v3/kv/range", data=json.dumps({"key": "eA=="}).encode(), method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if "header" in json.loads(response.read()):
                        return True
            except (OSError, ValueError):
                continue
        return False

    def kill(self, member: Member) -> None:
        """SIGKILL one member."""
        if member.proc is not None and member.proc.poll() is None:
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(10)

    def restart(self, member: Member) -> None:
        """Start a killed member again on its data."""
        self.start_member(member, state="existing")

    def kill_all(self) -> None:
        """SIGKILL every member (etcd entirely down)."""
        for member in self.members:
            self.kill(member)

    def restart_all(self) -> None:
        """Start every member again and wait for a leader."""
        for member in self.members:
            self.restart(member)
        wait_for(self.healthy, "an etcd leader after the restart", timeout=30)

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL)."""
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                member.proc.terminate()
                try:
                    member.proc.wait(10)
                except subprocess.TimeoutExpired:
                    member.proc.kill()
                    member.proc.wait()
