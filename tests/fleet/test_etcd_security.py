"""gpud against a secured etcd: TLS with client certificates (certificates made with openssl), and etcd's own auth
(users and roles). A host with the right files or password registers and serves; one without its client
certificate or with a wrong password keeps serving its own work, reports degraded `etcd_unreachable` with the
reason, and logs no traceback. One etcd member each (real etcd, real gpud processes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemonproc import DaemonProcess
from tests.fleet.etcdcluster import EtcdCluster
from tests.fleet.fleethosts import Fleet, finish, session_body, session_of
from tests.fleet.tlscerts import TlsFiles, make_certs
from tests.integration.gpuctl_env import start_host
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def certs(tmp_path: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    return make_certs(tmp_path / "certs")


def start_etcd(base: Path, tls: TlsFiles | None = None) -> EtcdCluster:
    """One etcd member."""
    return EtcdCluster(base, size=1, tls=tls).start()


@pytest.fixture
def tls_etcd(tmp_path: Path, certs: TlsFiles) -> Iterator[EtcdCluster]:
    """One member serving clients on https only, with client certificates required."""
    cluster = start_etcd(tmp_path / "etcd-tls", certs)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def auth_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One member with etcd auth on: user gpud may read and write /gpud/ only."""
    cluster = start_etcd(tmp_path / "etcd-auth")
    try:
        cluster.enable_auth("gpud", "gpud-password")
        yield cluster
    finally:
        cluster.stop()


def degraded_reason(hosts: Fleet, name: str) -> str | None:
    """The host's etcd_unreachable reason while /health says degraded, once it names what failed."""
    status, health = hosts.daemon(name).request("GET", "/health")
    if status != 503:
        return None
    reason = next((r for r in health["reasons"] if r.startswith("etcd_unreachable")), None)
    return None if reason is None or reason.endswith("not registered yet") else reason


def serves_its_own_work(hosts: Fleet, name: str) -> None:
    status, events = hosts.submit(name, session_body())
    assert status == 200 and finish(events)["status"] == "completed", events


def no_traceback(hosts: Fleet, name: str) -> None:
    daemon = hosts.daemon(name)
    assert daemon.proc is not None and daemon.proc.poll() is None, "the host exited"
    assert "Traceback" not in daemon.log, daemon.log[-3000:]
    assert "fleet: etcd unreachable, serving this host's own work" in daemon.log, daemon.log[-3000:]


def test_tls_with_client_certificates(tls_etcd: EtcdCluster, certs: TlsFiles) -> None:
    hosts = Fleet(tls_etcd)
    try:
        tls = {"GPUD_ETCD_CA_FILE": str(certs.ca)}
        client = {"GPUD_ETCD_CERT_FILE": str(certs.client_cert), "GPUD_ETCD_KEY_FILE": str(certs.client_key)}
        hosts.start("a", "b", env={**tls, **client})
        status, events = hosts.submit("a", session_body())
        assert status == 200
        session_id = session_of(events)
        status, used = hosts.submit("b", session_body(session_id=session_id))  # claim read over TLS, forwarded
        assert status == 200 and finish(used)["status"] == "completed", used
        assert tls_etcd.keys("/gpud/sessions/")[f"/gpud/sessions/{session_id}"] == "a"
        for name in ("a", "b"):
            assert hosts.daemon(name).request("GET", "/health")[0] == 200
        # Without its client certificate a host cannot reach etcd: degraded, serving its own work.
        hosts.hosts["c"] = start_host({**hosts.env("c"), **tls})
        reason = wait_for(lambda: degraded_reason(hosts, "c"), "c degraded", timeout=20)
        print(f"\nfleet, no client certificate: {reason}")
        serves_its_own_work(hosts, "c")
        no_traceback(hosts, "c")
        assert hosts.host_ids("a") == ["a", "b"]
    finally:
        hosts.close()


def test_a_missing_certificate_file_is_a_clear_config_error(tmp_path: Path, certs: TlsFiles) -> None:
    """Checked at start (gpud refuses to start, naming the setting), not found out later as an unreachable etcd."""
    daemon = DaemonProcess(
        tmp_path,
        env={
            "GPUD_ETCD_ENDPOINTS": "https://127.0.0.1:9",
            "GPUD_FLEET_KEY": "k",
            "GPUD_ETCD_CA_FILE": str(certs.ca),
            "GPUD_ETCD_CERT_FILE": str(tmp_path / "missing.pem"),
            "GPUD_ETCD_KEY_FILE": str(certs.client_key),
        },
    )
    daemon.start(wait=False)
    try:
        assert daemon.wait(30) != 0
        assert "etcd_cert_file" in daemon.log and "missing.pem" in daemon.log, daemon.log[-2000:]
        assert "Traceback" not in daemon.log, daemon.log[-3000:]
    finally:
        daemon.kill()


def test_etcd_auth_with_a_user_and_a_wrong_password(auth_etcd: EtcdCluster) -> None:
    hosts = Fleet(auth_etcd)
    try:
        hosts.start("a", "b", env={"GPUD_ETCD_USERNAME": "gpud", "GPUD_ETCD_PASSWORD": "gpud-password"})
        status, events = hosts.submit("a", session_body())
        assert status == 200
        status, used = hosts.submit("b", session_body(session_id=session_of(events)))
        assert status == 200 and finish(used)["status"] == "completed", used
        for name in ("a", "b"):
            assert hosts.daemon(name).request("GET", "/health")[0] == 200
        assert auth_etcd.keys("/gpud/hosts/").keys() == {"/gpud/hosts/a", "/gpud/hosts/b"}
        hosts.hosts["c"] = start_host({**hosts.env("c"), "GPUD_ETCD_USERNAME": "gpud", "GPUD_ETCD_PASSWORD": "wrong"})
        reason = wait_for(lambda: degraded_reason(hosts, "c"), "c degraded", timeout=20)
        print(f"\nfleet, wrong etcd password: {reason}")
        assert "gpud" in reason and "authentication failed" in reason, reason
        serves_its_own_work(hosts, "c")
        no_traceback(hosts, "c")
        assert hosts.host_ids("a") == ["a", "b"]
    finally:
        hosts.close()
