"""A real etcd cluster for tests: Debian's etcd-server, three members on loopback ports, data in a tmp dir.

Each member can be killed (SIGKILL) and started again on its data; the whole cluster stops at the end. Options:
`tls` (client URLs on https, client certificates required: tests/fleet/tlscerts.py) and, once started,
enable_auth() (etcd's users and roles, with a user allowed only the /gpud/ prefix).
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.daemonproc import free_port, stop_process
from tests.fleet.tlscerts import TlsFiles
from tests.waiting import wait_for

ROOT_PASSWORD = "root-password"


@dataclass
class Member:
    """One etcd member process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        """Its client URL (the gRPC gateway answers on it too)."""
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """Its peer URL."""
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    """Three (or `size`) members; start(), kill(member), restart(member), stop()."""

    base: Path
    size: int = 3
    tls: TlsFiles | None = None
    members: list[Member] = field(default_factory=list)
    auth: tuple[str, str] | None = None  # (user, password) once enable_auth() ran: what healthy() reads as

    def __post_init__(self) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        self.base.mkdir(parents=True, exist_ok=True)
        for index in range(self.size):
            name = f"m{index}"
            member = Member(name, free_port(), free_port(), self.base / name, self.base / f"{name}.log")
            member.scheme = "https" if self.tls else "http"
            self.members.append(member)

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
        if self.tls is not None:
            command += ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                        "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]  # fmt: skip
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
            try:
                if "header" in self.call("/v3/kv/range", {"key": "eA=="}, candidate):
                    return True
            except (OSError, ValueError):
                continue
        return False

    def _context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return context

    def call(self, path: str, body: dict[str, object], member: Member | None = None) -> dict[str, object]:
        """One gateway call (as the root user once auth is on), e.g. call("/v3/kv/range", {...})."""
        url = (member or next(m for m in self.members if m.proc and m.proc.poll() is None)).client_url
        headers = {}
        if self.auth is not None:
            name, password = self.auth
            token = self._post(url + "/v3/auth/authenticate", {"name": name, "password": password}, {})["token"]
            headers["Authorization"] = str(token)
        return self._post(url + path, body, headers)

    def _post(self, url: str, body: dict[str, object], headers: dict[str, str]) -> dict[str, object]:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
        with urllib.request.urlopen(request, timeout=2, context=self._context()) as response:
            return dict(json.loads(response.read()))

    def keys(self, prefix: str) -> dict[str, str]:
        """Every key under `prefix` with its value."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        b64 = base64.b64encode
        found = self.call(
            "/v3/kv/range", {"key": b64(prefix.encode()).decode(), "range_end": b64(end.encode()).decode()}
        )
        kvs = found.get("kvs") or []
        assert isinstance(kvs, list)
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode() for kv in kvs}

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against the cluster (as root once auth is on); its output."""
        command = ["etcdctl", "--endpoints", self.endpoints, *args]
        if self.auth is not None:
            command += ["--user", f"{self.auth[0]}:{self.auth[1]}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, env={"ETCDCTL_API": "3"})
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        return done.stdout

    def enable_auth(self, user: str, password: str) -> None:
        """etcd auth on: `root`, and `user` with a role that may read and write the /gpud/ prefix only."""
        self.etcdctl("user", "add", f"root:{ROOT_PASSWORD}")
        self.etcdctl("user", "add", f"{user}:{password}")
        self.etcdctl("role", "add", "gpud")
        self.etcdctl("role", "grant-permission", "gpud", "readwrite", "/gpud/", "--prefix=true")
        self.etcdctl("user", "grant-role", user, "gpud")
        self.etcdctl("auth", "enable")
        self.auth = ("root", ROOT_PASSWORD)

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
            if member.proc is not None:
                stop_process(member.proc)
