"""HIGH-2: anyone who could reach the TCP port could take gpud offline, and the admin socket's directory was not
checked. Each test attacks a real `gpud run` process.

Before: no header or idle deadline, no connection cap, a soft fd limit of 1024: 1100 slow connections took every
fd, /health timed out on both sockets, and asyncio logged 875,616 accept() tracebacks (389 MB) in 70 s.
Now: a cap per listener (public and admin apart), a header deadline, an idle deadline, a body deadline, the fd
limit raised and checked against the caps, and loop errors logged at most once per kind per 10 s.

The admin socket: with `--dev`'s /tmp fallback another user could create the directory first and put a fake
daemon there. gpud refuses such a directory; gpuctl refuses such a socket.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud.api.listener import REFUSED_LINGER_MAX
from gpud.daemon.resources import FD_RESERVE
from tests.daemonproc import REPO, DaemonProcess, UnixHTTPConnection
from tests.figures import Figures
from tests.integration.gpuctl_env import MODEL_ID, run_gpuctl, start_host
from tests.security.procstat import open_fds
from tests.waiting import wait_for

PUBLIC_CAP = 200
ADMIN_CAP = 16
HEADER = 1.0
ATTACK_CONNECTIONS = 1100
ATTACK_SECONDS = 5.0
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def _health(daemon: DaemonProcess, admin: bool, timeout: float = 10.0) -> int:
    """GET /health on a fresh connection: the status, or 0 when the connection failed."""
    conn: http.client.HTTPConnection = (
        UnixHTTPConnection(str(daemon.admin_socket), timeout)
        if admin
        else http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=timeout)
    )
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        conn.close()


class Sampler:
    """Reads the daemon's open fd count every 20 ms in a thread; keeps the highest."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.highest = open_fds(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError):
                self.highest = max(self.highest, open_fds(self.pid))

    def stop(self) -> int:
        """Stop sampling; the highest count seen."""
        self._stop.set()
        self._thread.join()
        return self.highest


def _guarded(factory: type[DaemonProcess], **env: str) -> DaemonProcess:
    base = {
        "GPUD_MAX_CONNECTIONS": str(PUBLIC_CAP),
        "GPUD_ADMIN_MAX_CONNECTIONS": str(ADMIN_CAP),
        "GPUD_HEADER_TIMEOUT_SECONDS": str(HEADER),
    }
    return factory(env={**base, **env}).start()


def test_slowloris_on_the_public_port_leaves_admin_and_fds_alone(
    daemon_factory: type[DaemonProcess], figures: Figures
) -> None:
    attack = "slowloris (HIGH-2)"
    daemon = _guarded(daemon_factory)
    assert daemon.proc is not None
    pid = daemon.proc.pid
    baseline = open_fds(pid)
    log_before = daemon.stderr_path.stat().st_size
    attacker = subprocess.Popen(
        [sys.executable, "-m", "tests.security.slowloris", str(daemon.port), str(ATTACK_CONNECTIONS),
         str(ATTACK_SECONDS)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert attacker.stdout is not None and attacker.stdout.readline().strip() == "attacking"
        started = time.monotonic()
        sampler = Sampler(pid)
        admin: list[tuple[int, float]] = []
        public: list[int] = []
        while time.monotonic() - started < ATTACK_SECONDS:
            sent = time.monotonic()
            admin.append((_health(daemon, admin=True), time.monotonic() - sent))
            public.append(_health(daemon, admin=False, timeout=3.0))
            time.sleep(0.02)
        stopped = time.monotonic()
        recovered = wait_for(lambda: _health(daemon, admin=False) == 200 and time.monotonic(), "public /health")
        out, _ = attacker.communicate(timeout=60)
        highest = sampler.stop()
    finally:
        if attacker.poll() is None:
            attacker.kill()
    stats = json.loads(out.strip().splitlines()[-1])
    latencies = [seconds for _, seconds in admin]
    figures.record(attack, "admin /health probes during attack", len(admin))
    figures.record(attack, "admin /health p50 during attack", statistics.median(latencies) * 1000, "ms")
    figures.record(attack, "admin /health p99 during attack", _percentile(latencies, 0.99) * 1000, "ms")
    figures.record(attack, "public /health answered 200 during attack", public.count(200) / len(public) * 100, "%")
    figures.record(attack, "attacker connections opened", stats["opened"])
    figures.record(attack, "refused with 503", stats["refused"])
    figures.record(attack, "refusal p99 (connect to 503)", _percentile(stats["refuse_seconds"], 0.99) * 1000, "ms")
    figures.record(attack, "cut by the header deadline", stats["cut"])
    figures.record(attack, "reset (neither 503 nor a clean close)", stats["reset"])
    figures.record(attack, "longest held before the cut", max(stats["cut_seconds"], default=0), "s")
    figures.record(attack, "daemon fds: baseline", baseline)
    figures.record(attack, "daemon fds: highest during attack", highest)
    figures.record(attack, "public /health back after attack stopped", recovered - stopped, "s")

    assert all(status == 200 for status, _ in admin), f"admin /health failed: {[s for s, _ in admin if s != 200]}"
    assert _percentile(latencies, 0.99) < 1.0
    assert stats["refused"] > 0 and _percentile(stats["refuse_seconds"], 0.99) < 0.5
    assert stats["cut"] > 0 and stats["never_cut"] == 0
    assert max(stats["cut_seconds"]) < HEADER + 3.0, "no connection outlives the header deadline by much"
    assert highest <= PUBLIC_CAP + ADMIN_CAP + FD_RESERVE
    # What the attack can cost at most: the cap, the refusals still waiting for their request, a few in flight.
    assert highest <= baseline + PUBLIC_CAP + REFUSED_LINGER_MAX + 8
    assert recovered - stopped < HEADER + 2.0
    fds_after = wait_for(lambda: (n := open_fds(pid)) <= baseline + 3 and n, "fds back near the baseline")
    figures.record(attack, "daemon fds: after", fds_after)
    log = daemon.stderr_path.read_bytes()[log_before:]
    figures.record(attack, "log bytes written during attack", len(log), "B")
    assert len(log) < 16 * 1024 and b"Traceback" not in log, log[:2000]
    assert b"refusing new ones with 503" in log
    # One line when the flood began; the repeats are counted and summed up once the 10 s interval ends.
    wait_for(lambda: "more connections refused on the public API" in daemon.log, "the refusals' summary line", 15)
    assert daemon.log.count("refusing new ones with 503") == 1


def test_idle_keep_alive_is_closed_but_long_streams_are_not(figures: Figures) -> None:
    attack = "idle and long streams"
    host = start_host({"GPUD_HEADER_TIMEOUT_SECONDS": "1", "GPUD_HTTP_IDLE_TIMEOUT_SECONDS": "1"})
    try:
        daemon = host.daemon
        idle = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        while idle.recv(65536):
            pass
        idle_for = figures.record(attack, "keep-alive connection closed after", time.monotonic() - answered, "s")
        idle.close()
        assert 0.8 <= idle_for < 3.0
        # Tokens 1.5 s apart: every gap is longer than the header and idle deadlines (1 s each).
        started = time.monotonic()
        events: dict[str, list[str]] = {}
        submit = threading.Thread(target=_collect, args=(daemon, "submit", None, events))
        submit.start()
        task_id = wait_for(lambda: _task_id(events.get("submit", [])), "the submitted task's id")
        replay = threading.Thread(target=_collect, args=(daemon, "events", task_id, events))
        replay.start()
        submit.join(30)
        replay.join(30)
        figures.record(attack, "stream with 1.5 s gaps lasted", time.monotonic() - started, "s")
        for name in ("submit", "events"):
            assert events[name][-1].startswith("task_finish") and '"completed"' in events[name][-1], events[name]
            assert sum(e.startswith("text_delta") for e in events[name]) == 3, events[name]
        assert "closed a connection" in daemon.log  # the idle one above, and only that kind
    finally:
        host.close()


def _task_id(events: list[str]) -> str | None:
    for event in events:
        data = json.loads(event.split(" ", 1)[1])
        if data.get("task_id"):
            return str(data["task_id"])
    return None


def _collect(daemon: DaemonProcess, how: str, task_id: str | None, into: dict[str, list[str]]) -> None:
    """Read one SSE stream to its end over the public port; keep `event json` lines."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    headers = {"X-API-Key": "test-key", "Content-Type": "application/json"}
    if how == "submit":
        body = {"task_type": "session", "task_difficulty": "low", "model_id": MODEL_ID, "task_preset": "stream",
                "metadata": {"max_tokens": 3, "delay": 1.5}}  # fmt: skip
        conn.request("POST", "/api/tasks/submit", body=json.dumps(body), headers=headers)
    else:
        conn.request("GET", f"/api/tasks/{task_id}/events", headers={**headers, "Last-Event-ID": "0"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    found = into.setdefault(how, [])
    name = ""
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            found.append(f"{name} {line[len('data: ') :]}")
            if name == "task_finish":
                break
    conn.close()


def test_a_slow_request_body_is_cut(daemon_factory: type[DaemonProcess], figures: Figures) -> None:
    attack = "slow POST body"
    daemon = daemon_factory(env={"GPUD_BODY_TIMEOUT_SECONDS": "1"}).start()
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    sock.sendall(
        b"POST /api/tasks/submit HTTP/1.1\r\nHost: x\r\nX-API-Key: test-key\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100000\r\n\r\n{"task_type": '
    )
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.2):
                sock.sendall(b" ")

    threading.Thread(target=trickle, daemon=True).start()
    received = b""
    answered_at = None
    try:
        while data := sock.recv(65536):
            received += data
            if answered_at is None and b"\r\n\r\n" in received:
                answered_at = time.monotonic()
    except ConnectionResetError:
        pass
    closed_at = time.monotonic()
    stop.set()
    sock.close()
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b'"request_timeout"' in received and b"Connection: close" in received
    assert answered_at is not None
    figures.record(attack, "408 after", answered_at - started, "s")
    figures.record(attack, "connection closed after", closed_at - started, "s")
    assert 0.9 <= answered_at - started < 2.5
    assert closed_at - started < 1 + 2 + 2.0  # body deadline + aiohttp's linger (2 s) + slack


def _fill(target: str | tuple[str, int], count: int) -> list[socket.socket]:
    """`count` connections that send nothing."""
    held = []
    for _ in range(count):
        family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.connect(target)
        held.append(sock)
    return held


def _refused(target: str | tuple[str, int]) -> bool:
    """A new connection is answered with 503 (the cap is full)."""
    family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        sock.connect(target)
        try:
            return sock.recv(64).startswith(b"HTTP/1.1 503")
        except TimeoutError:
            return False  # accepted: it waits for a request head


def test_the_admin_cap_is_counted_apart_from_the_public_one(daemon_factory: type[DaemonProcess]) -> None:
    daemon = daemon_factory(
        env={"GPUD_MAX_CONNECTIONS": "20", "GPUD_ADMIN_MAX_CONNECTIONS": "4", "GPUD_HEADER_TIMEOUT_SECONDS": "60"}
    ).start()
    public: tuple[str, int] = ("127.0.0.1", daemon.port)
    admin = str(daemon.admin_socket)
    held = _fill(public, 20)
    wait_for(lambda: _refused(public), "the public cap full")
    # A client that sends its request at once still reads the 503 (not a reset): the refusal drains it first.
    assert [_health(daemon, admin=False) for _ in range(20)] == [503] * 20
    assert [_health(daemon, admin=True) for _ in range(5)] == [200] * 5
    assert not _refused(admin)
    for sock in held:
        sock.close()
    wait_for(lambda: _health(daemon, admin=False) == 200, "public slots given back")
    held = _fill(admin, 4)
    wait_for(lambda: _refused(admin), "the admin cap full")
    assert [_health(daemon, admin=True) for _ in range(20)] == [503] * 20
    assert [_health(daemon, admin=False) for _ in range(5)] == [200] * 5
    for sock in held:
        sock.close()
    wait_for(lambda: _health(daemon, admin=True) == 200, "admin slots given back")


# ---- the admin socket's directory ----------------------------------------------------------------------------------


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A directory under /tmp that other users may traverse (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="gpud-dir-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_dev_socket_dir_made_first_by_another_user_is_refused(
    daemon_factory: type[DaemonProcess], public_tmp: Path
) -> None:
    runtime_dir = public_tmp / "xdg"  # what an attacker would pre-create as /tmp/gpud-<uid>
    (runtime_dir / "gpud").mkdir(parents=True)
    for path in (runtime_dir, runtime_dir / "gpud"):
        os.chown(path, NOBODY, NOBODY)
    daemon = daemon_factory(env={"GPUD_ADMIN_SOCKET": "", "XDG_RUNTIME_DIR": str(runtime_dir)}, args=["--dev"])
    daemon.start(wait=False)
    assert daemon.wait() == 1
    assert f"refusing to put the admin socket {runtime_dir}/gpud/gpud.sock there" in daemon.log
    assert f"is owned by uid {NOBODY}, not by root or uid 0" in daemon.log
    assert not (runtime_dir / "gpud" / "gpud.sock").exists()


def test_world_writable_socket_dir_is_refused(daemon_factory: type[DaemonProcess], public_tmp: Path) -> None:
    shared = public_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # sticky does not help the socket's own directory: others may still add entries
    daemon = daemon_factory(env={"GPUD_ADMIN_SOCKET": str(shared / "gpud.sock")})
    daemon.start(wait=False)
    assert daemon.wait() == 1
    assert f"{shared} is writable by others (mode 1777)" in daemon.log


def test_missing_socket_dirs_are_made_not_writable_by_others(
    daemon_factory: type[DaemonProcess], public_tmp: Path
) -> None:
    path = public_tmp / "a" / "b" / "gpud.sock"
    daemon = daemon_factory(env={"GPUD_ADMIN_SOCKET": str(path)}).start()
    daemon.admin_socket = path
    assert [oct(d.stat().st_mode & 0o7777) for d in (path.parent.parent, path.parent)] == ["0o755", "0o755"]
    assert _health(daemon, admin=True) == 200


class FakeDaemon:
    """What an attacker would run: a Unix socket that answers every request with a healthy-looking 200."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        body = b'{"status": "ok"}'
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        """Stop listening."""
        self._sock.close()


@pytest.mark.parametrize("case", ["world-writable dir", "socket of another user", "dir of another user"])
def test_gpuctl_refuses_a_socket_another_user_could_have_placed(case: str, public_tmp: Path) -> None:
    if case != "world-writable dir" and os.geteuid() != 0:
        pytest.skip("needs root to chown")
    directory = public_tmp / "gpud"
    directory.mkdir()
    fake = FakeDaemon(directory / "gpud.sock")
    try:
        if case == "world-writable dir":
            directory.chmod(0o777)
        elif case == "socket of another user":
            os.chown(fake.path, NOBODY, NOBODY)
        else:
            os.chown(directory, NOBODY, NOBODY)
        result = run_gpuctl(str(fake.path), ["status"])
    finally:
        fake.close()
    assert result.returncode == 3, result.stderr
    assert f"refusing to use the admin socket {fake.path} (from --socket)" in result.stderr
    assert fake.connections == 0, "gpuctl never connected"
    directory.chmod(0o755)


def test_gpuctl_still_talks_to_a_safe_socket(daemon_factory: type[DaemonProcess], public_tmp: Path) -> None:
    daemon = daemon_factory(env={"GPUD_ADMIN_SOCKET": str(public_tmp / "run" / "gpud.sock")}).start()
    link_dir = public_tmp / "links"
    link_dir.mkdir()
    (link_dir / "gpud.sock").symlink_to(public_tmp / "run" / "gpud.sock")
    for path in (public_tmp / "run" / "gpud.sock", link_dir / "gpud.sock"):
        result = run_gpuctl(str(path), ["status", "-o", "json"])
        assert result.returncode == 0 and json.loads(result.stdout)["status"] == "ok", result.stderr
    link_dir.chmod(0o777)  # a link in a directory others can write is as bad as the socket there
    result = run_gpuctl(str(link_dir / "gpud.sock"), ["status"])
    assert result.returncode == 3 and "is writable by others" in result.stderr
    link_dir.chmod(0o755)
    assert daemon.proc is not None and daemon.proc.poll() is None


# ---- the fd budget --------------------------------------------------------------------------------------------------


class LimitedDaemon(DaemonProcess):
    """A daemon started with RLIMIT_NOFILE soft and hard set to `nofile` (as a unit's LimitNOFILE would)."""

    nofile = 600

    def start(self, wait: bool = True) -> DaemonProcess:
        """Like DaemonProcess.start, with the limit set in the child."""
        limit = self.nofile
        with open(self.stderr_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpud", "run", *self.args],
                env=self.env, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
            )  # fmt: skip
        if wait:
            self.wait_for_message("READY=1")
        return self


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit")


def test_the_fd_limit_is_raised_and_the_public_cap_fitted_to_it(
    tmp_path: Path, daemon_factory: type[DaemonProcess]
) -> None:
    daemon = daemon_factory().start()
    assert daemon.proc is not None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert _soft_nofile(daemon.proc.pid) == hard, "the soft limit is raised to the hard one"
    limited = LimitedDaemon(tmp_path)
    try:
        limited.start()
        fitted = 600 - 64 - FD_RESERVE
        assert f"open-file limit 600 leaves room for {fitted} public connections" in limited.log
        assert f"(at most {fitted} connections)" in limited.log
        assert _health(limited, admin=False) == 200
    finally:
        limited.kill()
