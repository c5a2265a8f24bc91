"""A real `gpud run` process: systemd notifications on a real datagram socket, signals, the admin socket."""

from __future__ import annotations

import errno
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.daemonproc import REPO, DaemonProcess


def test_ready_status_watchdog_and_clean_sigterm(daemon_factory: type[DaemonProcess]) -> None:
    daemon = daemon_factory(env={"WATCHDOG_USEC": "200000"}).start()
    ready = daemon.wait_for_message("READY=1")
    assert "STATUS=serving; 2 GPU(s)" in ready
    daemon.wait_for_message("WATCHDOG=1")
    pings = len([m for m in daemon.messages if m == "WATCHDOG=1"])
    status, body = daemon.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    daemon.wait_for_message("STOPPING=1")
    assert pings >= 1
    assert not daemon.admin_socket.exists(), "the admin socket file is removed on clean shutdown"


def test_sigint_also_stops_cleanly(daemon_factory: type[DaemonProcess]) -> None:
    daemon = daemon_factory().start()
    daemon.signal(signal.SIGINT)
    assert daemon.wait() == 0


def test_no_watchdog_pings_without_watchdog_usec(daemon_factory: type[DaemonProcess]) -> None:
    daemon = daemon_factory().start()
    daemon.request("GET", "/health")
    daemon.signal(signal.SIGTERM)
    daemon.wait()
    daemon.wait_for_message("STOPPING=1")
    assert "WATCHDOG=1" not in daemon.messages


def test_sighup_reloads_presets_without_restart(daemon_factory: type[DaemonProcess], tmp_path: Path) -> None:
    presets = tmp_path / "models.yaml"
    presets.write_text("models:\n  m1:\n    p1: {docker_image: 'img:1'}\n")
    daemon = daemon_factory(env={"GPUD_PRESETS_FILE": str(presets)}).start()
    pid = daemon.proc.pid  # type: ignore[union-attr]
    status, body = daemon.request("GET", "/api/presets", admin=True)
    assert [p["image"] for p in body["presets"]] == ["img:1"]
    # Keep a connection open across the reload: reloading must not drop it.
    held = socket.create_connection(("127.0.0.1", daemon.port))
    presets.write_text("models:\n  m1:\n    p1: {docker_image: 'img:2'}\n  m2:\n    p2: {docker_image: 'img:3'}\n")
    daemon.messages.clear()
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_message("RELOADING=1")
    daemon.wait_for_message("READY=1")
    status, body = daemon.request("GET", "/api/presets", admin=True)
    assert sorted(p["image"] for p in body["presets"]) == ["img:2", "img:3"]
    assert daemon.proc.pid == pid and daemon.proc.poll() is None  # type: ignore[union-attr]
    held.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert held.recv(100).startswith(b"HTTP/1.1 200")
    held.close()
    assert "presets changed ['m1/p1', 'm2/p2']" in daemon.log


def test_broken_reload_keeps_running_configuration(daemon_factory: type[DaemonProcess], tmp_path: Path) -> None:
    presets = tmp_path / "models.yaml"
    presets.write_text("models:\n  m1:\n    p1: {docker_image: 'img:1'}\n")
    daemon = daemon_factory(env={"GPUD_PRESETS_FILE": str(presets)}).start()
    presets.write_text("models:\n  m1:\n    p1: {command: [x]}\n")
    status, body = daemon.request("POST", "/api/reload", admin=True)
    assert status == 200 and body["reloaded"] is False
    assert "docker_image is required" in body["problems"][0]
    status, body = daemon.request("GET", "/api/presets", admin=True)
    assert [p["image"] for p in body["presets"]] == ["img:1"]


def test_admin_socket_mode_and_directory(daemon_factory: type[DaemonProcess]) -> None:
    daemon = daemon_factory().start()
    mode = daemon.admin_socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    status, body = daemon.request("GET", "/api/gpus", admin=True)  # no API key needed on the admin socket
    assert status == 200 and len(body["gpus"]) == 2


NOBODY = 65534

CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgid(65534); os.setgroups([]); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
s.sendall(b"GET /api/gpus HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
print(s.recv(65536).decode())
"""


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another uid needs root")
def test_unprivileged_peer_is_refused(daemon_factory: type[DaemonProcess]) -> None:
    # pytest's tmp dirs are private to root; put the socket where any user may traverse to it.
    with tempfile.TemporaryDirectory(prefix="gpud-peer-") as public:
        os.chmod(public, 0o755)
        daemon = daemon_factory(env={"GPUD_ADMIN_SOCKET": f"{public}/run/gpud.sock"}).start()
        daemon.admin_socket = Path(public) / "run" / "gpud.sock"
        _check_refusals(daemon)
        daemon.kill()


def _check_refusals(daemon: DaemonProcess) -> None:
    assert stat.S_IMODE(daemon.admin_socket.parent.stat().st_mode) == 0o755

    def as_nobody() -> str:
        return subprocess.run(
            [sys.executable, "-c", CONNECT_AS_NOBODY, str(daemon.admin_socket)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    assert as_nobody().strip() == "EACCES"  # mode 0660: the filesystem refuses other users
    os.chmod(daemon.admin_socket, 0o666)  # even when the file is opened up, SO_PEERCRED refuses the peer
    answer = as_nobody()
    assert answer.startswith("HTTP/1.1 403") and "peer_not_allowed" in answer and f"uid {NOBODY}" in answer


def test_stale_socket_is_replaced_and_live_daemon_refused(daemon_factory: type[DaemonProcess]) -> None:
    first = daemon_factory()
    first.admin_socket.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(first.admin_socket))  # bound, never listening, then closed: what a crash leaves
    stale.close()
    first.start()
    assert "replacing stale admin socket" in first.log
    second = daemon_factory(env={"GPUD_ADMIN_SOCKET": str(first.admin_socket)}).start(wait=False)
    assert second.wait() == 1
    assert "another gpud is already listening on" in second.log
    status, _ = first.request("GET", "/health")
    assert status == 200  # the first one is unharmed


def test_journal_stream_gives_priority_prefixes(daemon_factory: type[DaemonProcess]) -> None:
    daemon = daemon_factory(env={"JOURNAL_STREAM": "8:1234"}).start()
    daemon.signal(signal.SIGTERM)
    daemon.wait()
    lines = [line for line in daemon.log.splitlines() if line]
    assert lines and all(line.startswith("<") for line in lines)
    assert any(line.startswith("<6>gpud.daemon.run: gpud") for line in lines)


def test_bad_configuration_exits_non_zero_with_the_problem(daemon_factory: type[DaemonProcess]) -> None:
    daemon = daemon_factory(env={"SESSION_QUEUE_MAX_SIZE": "many"}).start(wait=False)
    assert daemon.wait() == 2
    assert "env SESSION_QUEUE_MAX_SIZE: session_queue_max_size" in daemon.log


def test_port_in_use_is_a_clear_error(daemon_factory: type[DaemonProcess]) -> None:
    first = daemon_factory().start()
    second = daemon_factory(env={"GPUD_HTTP_LISTEN": f"127.0.0.1:{first.port}"}).start(wait=False)
    assert second.wait() != 0
    assert "address already in use" in second.log.lower() or str(errno.EADDRINUSE) in second.log


def test_sigterm_with_a_live_session_gives_clients_task_finish_and_exit_0() -> None:
    from tests.integration.gpuctl_env import MODEL_ID, start_host

    host = start_host()
    try:
        port = host.daemon.port
        body = json.dumps(
            {
                "task_type": "session",
                "model_id": MODEL_ID,
                "task_preset": "stream",
                "metadata": {"max_tokens": 500, "delay": 0.1},
            }
        ).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/api/tasks/submit", body=body, headers={"X-API-Key": "test-key"})
        response = conn.getresponse()
        seen = b""
        while b"event: text_delta" not in seen:  # the session is up and streaming
            seen += response.read1(4096)
        host.daemon.signal(signal.SIGTERM)
        seen += response.read()  # the daemon finishes the stream before it closes its sockets
        assert host.daemon.wait() == 0
        assert b"event: task_finish" in seen and b'"code":"session_shutdown"' in seen
        assert "stopped" in host.daemon.log
    finally:
        host.close()


def test_socket_activation_serves_on_the_sockets_systemd_passes(tmp_path: Path) -> None:
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin_path = tmp_path / "activated.sock"
    admin.bind(str(admin_path))
    admin.listen(16)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    port = tcp.getsockname()[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(20)

    def as_systemd_passes_them() -> None:  # fds 3 and 4, as sd_listen_fds() expects
        os.dup2(admin.fileno(), 3)
        os.dup2(tcp.fileno(), 4)

    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "admin:http",
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "GPUD_GPU_BACKEND": "static",
        "GPU_DEVICE_IDS": "0",
        "GPUD_RUNTIME": "process",
        "GPUD_STATE_DIR": str(tmp_path / "state"),
        "GPUD_ADMIN_SOCKET": str(tmp_path / "not-used" / "gpud.sock"),
        "GPUD_HTTP_LISTEN": "127.0.0.1:1",  # not where the test connects: /health below goes through the passed socket
        "GPUD_PRESETS_FILE": str(REPO / "gpud" / "settings" / "defaults" / "models.yaml"),
    }
    # LISTEN_PID must be the daemon's own pid: the shell exports its pid, then execs gpud in its place.
    proc = subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID=$$ exec "{sys.executable}" -m gpud run'],
        env=env,
        pass_fds=(3, 4),
        preexec_fn=as_systemd_passes_them,
        stderr=subprocess.PIPE,
    )
    try:
        assert b"READY=1" in notify.recv(4096)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(admin_path))
        probe.sendall(b"GET /api/gpus HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert probe.recv(100).startswith(b"HTTP/1.1 200")
        probe.close()
        assert not (tmp_path / "not-used").exists(), "gpud bound its own admin socket despite activation"
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, proc.stderr.read().decode() if proc.stderr else ""
        for sock in (admin, tcp, notify):
            sock.close()
