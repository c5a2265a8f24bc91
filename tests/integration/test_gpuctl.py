"""gpuctl against a real gpud (process runtime) on a real admin socket: click's runner and a real subprocess.

Every command runs in both output formats; error cases use a missing socket, a socket the user may not open
(gpuctl runs as uid 65534), and daemon errors. The model file service is the reference one (tests/fileservice.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gpuctl.cli import cli
from gpuctl.client import DEFAULT_SOCKET, SocketChoice, resolve_socket
from gpud import __version__
from tests.daemonproc import REPO
from tests.integration.cutproxy import CuttingProxy
from tests.integration.gpuctl_env import (
    MODEL_ID,
    TOKENS,
    GpudHost,
    end_live_sessions,
    gpuctl_command,
    gpuctl_env,
    start_host,
)
from tests.waiting import wait_for

FETCH_MODEL = "fetched-model"
STREAM_30 = ("--meta", "max_tokens=30", "--meta", "delay=0.1")
STREAM_200 = ("--meta", "max_tokens=200", "--meta", "delay=0.1")


@dataclass
class Result:
    """What one gpuctl run gave."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout parsed as one JSON document."""
        return json.loads(self.stdout)

    def json_lines(self) -> list[dict[str, Any]]:
        """stdout parsed as one JSON object per line."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


Gpuctl = Callable[..., Result]


def run_in_process(socket: str, *args: str) -> Result:
    """gpuctl through click's CliRunner (same process)."""
    result = CliRunner().invoke(cli, ["--socket", socket, *args], env={"GPUD_SOCKET": None, "NO_COLOR": None})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


def run_subprocess(socket: str, *args: str, env: dict[str, str] | None = None) -> Result:
    """gpuctl as a real process (the console script)."""
    proc = subprocess.run(
        [*gpuctl_command(), "--socket", socket, *args],
        capture_output=True,
        text=True,
        env=gpuctl_env(env),
        cwd=REPO,
        timeout=60,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def file_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The reference file service as a process, serving FETCH_MODEL."""
    weights = tmp_path_factory.mktemp("fs") / "weights.bin"
    weights.write_bytes(b"weights-v1\n" * 100)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fileservice.py"), "--file", f"{FETCH_MODEL}={weights}"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("URL "), line
    yield line.split()[1]
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def host(file_service: str) -> Iterator[GpudHost]:
    """One gpud for the module (tests leave no sessions, drains or cached extra models behind)."""
    started = start_host({"FILE_SERVICE_URL": file_service, "FILE_SERVICE_INTERNAL_KEY": "test-internal-key"})
    yield started
    started.close()


@pytest.fixture(autouse=True)
def clean(host: GpudHost) -> Iterator[None]:
    """After each test: kill live sessions, undrain GPUs, so the next test starts from an idle daemon."""
    yield
    end_live_sessions(host)
    for gpu_id in (0, 1):
        host.daemon.request("POST", f"/api/gpus/{gpu_id}/undrain", admin=True)


@pytest.fixture(params=["runner", "subprocess"])
def gpuctl(request: pytest.FixtureRequest, host: GpudHost) -> Gpuctl:
    """gpuctl bound to the test daemon, once through click's runner and once as a real process."""
    runner = run_in_process if request.param == "runner" else run_subprocess
    return lambda *args: runner(host.socket, *args)


def expected_text(count: int) -> str:
    """What the streaming example worker says for max_tokens=count."""
    words = TOKENS.split()
    return " ".join(words[i % len(words)] for i in range(count))


def new_session(gpuctl: Gpuctl, tokens: int = 3) -> str:
    """Run one session task; return the session's id."""
    result = gpuctl("submit", MODEL_ID, "stream", "--meta", f"max_tokens={tokens}", "-o", "json")
    assert result.code == 0, result.stderr
    finish = result.json_lines()[-1]
    assert finish["event"] == "task_finish" and finish["data"]["status"] == "completed"
    ready = [e for e in result.json_lines() if e["event"] == "connection"]
    return str(ready[0]["data"]["session_id"])


# ---- read-only commands, both formats -----------------------------------------------------------------------------


def test_status(gpuctl: Gpuctl, host: GpudHost) -> None:
    body = gpuctl("status", "-o", "json")
    assert body.code == 0, body.stderr
    report = body.json()
    assert report["status"] == "ok" and report["version"] == __version__
    assert report["runtime"]["name"] == "process" and len(report["gpus"]) == 2
    table = gpuctl("status")
    assert table.code == 0
    assert "status:   ok" in table.stdout and f"version:  {__version__}" in table.stdout
    assert "process, reachable, no isolation" in table.stdout
    assert "2 (static): 0 leased, 0 drained" in table.stdout
    assert f"socket:   {host.socket} (--socket)" in table.stdout


def test_gpus(gpuctl: Gpuctl) -> None:
    body = gpuctl("gpus", "-o", "json").json()
    assert [(g["id"], g["difficulty"], g["drained"]) for g in body["gpus"]] == [(0, "low", False), (1, "high", False)]
    lines = gpuctl("gpus").stdout.splitlines()
    headers = ["ID", "DIFFICULTY", "NAME", "MEMORY", "UTIL", "TEMP", "LEASE", "HEALTH", "DRAINED", "ERROR"]
    assert lines[0].split() == headers
    assert lines[1].split()[:2] == ["0", "low"] and lines[2].split()[:2] == ["1", "high"]
    # aligned: every row's DIFFICULTY column starts where the header's does
    col = lines[0].index("DIFFICULTY")
    assert all(line[col - 2 : col] == "  " and line[col] != " " for line in lines)


def test_presets(gpuctl: Gpuctl) -> None:
    body = gpuctl("presets", "-o", "json").json()
    names = {(p["model_id"], p["preset"], p["mode"]) for p in body["presets"]}
    assert {(MODEL_ID, "stream", "session"), (MODEL_ID, "oneoff", "oneoff")} <= names
    table = gpuctl("presets").stdout
    assert table.splitlines()[0].split()[:3] == ["MODEL", "PRESET", "MODE"]
    assert any(
        line.split()[:4] == [MODEL_ID, "stream", "session", "gpud-worker-python:latest"] for line in table.splitlines()
    )


def test_list_shapes(gpuctl: Gpuctl) -> None:
    for command, key, header in (
        (["sessions", "ls"], "sessions", "SESSION"),
        (["tasks", "ls"], "tasks", "TASK"),
        (["models", "ls"], "models", "MODEL"),
    ):
        body = gpuctl(*command, "-o", "json")
        assert body.code == 0 and isinstance(body.json()[key], list)
        assert gpuctl(*command).stdout.split()[0] == header


# ---- submit -------------------------------------------------------------------------------------------------------


def test_submit_prints_text_and_events(gpuctl: Gpuctl) -> None:
    events = gpuctl("submit", MODEL_ID, "stream", "--meta", "max_tokens=3", "-o", "json")
    lines = events.json_lines()
    assert [e["id"] for e in lines] == list(range(1, len(lines) + 1))
    assert "".join(e["data"]["delta"] for e in lines if e["event"] == "text_delta") == expected_text(3)
    assert lines[-1]["event"] == "task_finish" and lines[-1]["data"]["status"] == "completed"
    session_id = next(e["data"]["session_id"] for e in lines if e["event"] == "connection")
    # The session holds the only 'low' GPU: later tasks go to it by id.
    plain = gpuctl("submit", MODEL_ID, "stream", "--session", session_id, "--meta", "max_tokens=4")
    assert plain.code == 0, plain.stderr
    assert plain.stdout == expected_text(4) + "\n"
    assert plain.stderr == ""
    verbose = gpuctl(
        "submit", MODEL_ID, "stream", "--session", session_id, "--meta", "max_tokens=2", "--meta", "prompt=hi", "-v"
    )
    assert verbose.stdout == expected_text(2) + "\n"
    assert verbose.stderr.startswith("task ")
    assert "connection  status=session_ready" in verbose.stderr and "task_finish status=completed" in verbose.stderr
    assert "[stderr] prompt='hi' max_tokens=2" in verbose.stderr
    # A new session finds the only 'low' GPU held by that idle session: it ends it (GPUD_SESSION_EVICT_IDLE) and
    # runs there at once, where it used to get 503 until the idle timeout; the old id now answers 410.
    second = gpuctl("submit", MODEL_ID, "stream", "--meta", "max_tokens=2")
    assert second.code == 0 and second.stdout == expected_text(2) + "\n", second.stderr
    evicted = gpuctl("submit", MODEL_ID, "stream", "--session", session_id)
    assert evicted.code == 1 and "session_evicted" in evicted.stderr and "(HTTP 410)" in evicted.stderr


def test_submit_oneoff_and_metadata_file(gpuctl: Gpuctl, tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"prompt": "from the file", "exit_code": 0}))
    result = gpuctl("submit", MODEL_ID, "oneoff", "--oneoff", "--metadata-file", str(meta), "--meta", "max_tokens=2")
    assert result.code == 0, result.stderr
    assert result.stdout == "from\nthe\n"  # --meta overrides the file's fields


def test_submit_failure_timeout_and_usage_exit_codes(gpuctl: Gpuctl) -> None:
    failed = gpuctl("submit", MODEL_ID, "oneoff", "--oneoff", "--meta", "exit_code=3", "--meta", "max_tokens=1")
    assert failed.code == 4 and failed.stdout == "token-0\n"
    assert "failed" in failed.stderr and "(exit code 3)" in failed.stderr
    timeout = gpuctl("submit", MODEL_ID, "oneoff", "--oneoff", "--meta", "sleep=30", "--timeout", "1")
    assert timeout.code == 4 and "timeout" in timeout.stderr
    assert gpuctl("submit", MODEL_ID).code == 2  # missing PRESET: click's usage error
    assert gpuctl("submit", MODEL_ID, "stream", "--meta", "novalue").code == 2
    assert gpuctl("submit", MODEL_ID, "stream", "--oneoff", "--session", "abc").code == 2
    assert gpuctl("gpus", "-o", "yaml").code == 2


def test_submit_api_errors(gpuctl: Gpuctl) -> None:
    forbidden = gpuctl("submit", MODEL_ID, "forbidden", "--oneoff")
    assert forbidden.code == 1 and forbidden.stdout == ""
    assert "gpuctl: image_not_allowed: " in forbidden.stderr and "(HTTP 403)" in forbidden.stderr
    unknown = gpuctl("submit", "no-such-model", "stream")
    assert unknown.code == 1 and "(HTTP 404)" in unknown.stderr


def test_submit_streams_tokens_as_they_arrive(host: GpudHost) -> None:
    """The first delta reaches gpuctl's stdout while the task is still running, long before task_finish."""
    proc = subprocess.Popen(
        [*gpuctl_command(), "--socket", host.socket, "submit", MODEL_ID, "stream", *STREAM_30],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=gpuctl_env(),
        cwd=REPO,
    )
    assert proc.stdout is not None
    first = os.read(proc.stdout.fileno(), 65536)  # returns as soon as gpuctl has written anything
    # At the moment the first bytes were read, gpuctl still runs and the daemon still runs the task.
    still_running = proc.poll() is None
    _, tasks = host.daemon.request("GET", "/api/tasks", admin=True)
    active = [t for t in tasks["tasks"] if t["status"] not in ("completed", "failed", "timeout", "cancelled")]
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    full = expected_text(30) + "\n"
    assert first and full.startswith(first.decode()) and len(first) < len(full) // 2  # not one buffered batch
    assert still_running and len(active) == 1
    assert (first + rest).decode() == full


# ---- sessions and tasks -------------------------------------------------------------------------------------------


def test_sessions_show_keepalive_kill(gpuctl: Gpuctl) -> None:
    session_id = new_session(gpuctl)
    listed = gpuctl("sessions", "ls", "-o", "json").json()["sessions"]
    live = [(s["session_id"], s["state"]) for s in listed if s["state"] not in ("stopped", "failed")]
    assert live == [(session_id, "ready")]
    rows = [line.split() for line in gpuctl("sessions", "ls").stdout.splitlines()]
    assert rows[0][:4] == ["SESSION", "MODEL", "PRESET", "STATE"]
    assert [session_id[:12], MODEL_ID, "stream", "ready", "0"] in [row[:5] for row in rows]
    shown = gpuctl("sessions", "show", session_id, "-o", "json").json()
    assert shown["session_id"] == session_id and shown["tasks_run"] == 1
    assert f"session:      {session_id}" in gpuctl("sessions", "show", session_id).stdout
    before = shown["last_activity"]
    kept = gpuctl("sessions", "keepalive", session_id, "-o", "json").json()
    assert kept["last_activity"] > before
    assert "state:        ready" in gpuctl("sessions", "keepalive", session_id).stdout
    # A second task reuses the loaded session.
    again = gpuctl("submit", MODEL_ID, "stream", "--session", session_id, "--meta", "max_tokens=2")
    assert again.code == 0 and again.stdout == expected_text(2) + "\n"
    killed = gpuctl("sessions", "kill", session_id, "-o", "json").json()
    assert killed["state"] == "stopped" and killed["end_reason"] == "killed"
    ended = gpuctl("submit", MODEL_ID, "stream", "--session", session_id)
    assert ended.code == 1 and "session_ended" in ended.stderr and "(HTTP 410)" in ended.stderr
    gone = gpuctl("sessions", "kill", session_id)  # a table-format kill of an ended session still answers
    assert gone.code == 0 and "state:        stopped" in gone.stdout


def test_tasks_ls_show_events(gpuctl: Gpuctl) -> None:
    result = gpuctl("submit", MODEL_ID, "stream", "--meta", "max_tokens=3", "-o", "json")
    task_id = result.json_lines()[0]["data"]["task_id"]
    listed = gpuctl("tasks", "ls", "-o", "json").json()["tasks"]
    assert task_id in [t["task_id"] for t in listed]
    assert any(
        line.startswith(task_id[:12]) and "completed" in line for line in gpuctl("tasks", "ls").stdout.splitlines()
    )
    shown = gpuctl("tasks", "show", task_id, "-o", "json").json()
    assert shown["status"] == "completed" and shown["text"] == expected_text(3)
    table = gpuctl("tasks", "show", task_id).stdout
    assert f"task:      {task_id}" in table and table.rstrip().endswith(expected_text(3))
    replay = gpuctl("tasks", "events", task_id, "-o", "json").json_lines()
    assert replay == result.json_lines()  # the same events, ids and data
    after = gpuctl("tasks", "events", task_id, "--after", "3", "-o", "json").json_lines()
    assert after == replay[3:]
    human = gpuctl("tasks", "events", task_id)
    assert human.code == 0 and 'text_delta  "alpha "' in human.stdout and "task_finish" in human.stdout
    text = gpuctl("tasks", "events", task_id, "--text")
    assert text.stdout == expected_text(3) + "\n"
    finished = gpuctl("tasks", "cancel", task_id)
    assert finished.code == 1 and "task_finished" in finished.stderr and "(HTTP 409)" in finished.stderr
    assert gpuctl("tasks", "show", "nope").code == 1


def test_tasks_cancel_ends_a_running_submit(gpuctl: Gpuctl, host: GpudHost) -> None:
    proc = subprocess.Popen(
        [*gpuctl_command(), "--socket", host.socket, "submit", MODEL_ID, "stream", "-v", *STREAM_200],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=gpuctl_env(),
        cwd=REPO,
    )

    def running() -> str | None:
        _, body = host.daemon.request("GET", "/api/tasks", admin=True)
        ids = [t["task_id"] for t in body["tasks"] if t["status"] == "running"]
        return ids[0] if ids else None

    task_id = wait_for(running, "a running task")
    cancelled = gpuctl("tasks", "cancel", task_id, "-o", "json")
    assert cancelled.code == 0 and cancelled.json()["task_id"] == task_id
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 4
    assert f"gpuctl: task {task_id} cancelled" in err
    assert out.startswith("alpha ")


# ---- logs ---------------------------------------------------------------------------------------------------------


def test_logs(gpuctl: Gpuctl, host: GpudHost) -> None:
    session_id = new_session(gpuctl)
    # fail=true makes the worker print a traceback to its stderr: real container output.
    failed = gpuctl(
        "submit", MODEL_ID, "stream", "--session", session_id, "--meta", "fail=true", "--meta", "max_tokens=4"
    )
    assert failed.code == 4 and "RuntimeError" in failed.stderr
    table = gpuctl("logs", session_id)
    assert table.code == 0 and table.stdout == ""  # the worker wrote only to stderr
    assert "RuntimeError: failure requested by metadata.fail" in table.stderr
    lines = gpuctl("logs", session_id, "-o", "json").json_lines()
    assert lines and all(entry["stream"] == "stderr" for entry in lines)
    assert lines[-1]["line"] == "RuntimeError: failure requested by metadata.fail"
    assert gpuctl("logs", session_id, "--tail", "1", "-o", "json").json_lines() == lines[-1:]
    assert gpuctl("logs", "no-such-session").code == 1
    daemon = host.daemon
    status, body = daemon.request("GET", f"/api/sessions/{session_id}/logs?tail=-1", admin=True)
    assert status == 400 and body["error"]["code"] == "invalid_tail"
    status, text = daemon.request("GET", f"/api/sessions/{session_id}/logs?tail=1", admin=True)
    assert status == 200 and text == "RuntimeError: failure requested by metadata.fail\n"  # plain text by default
    status, _ = daemon.request("GET", f"/api/sessions/{session_id}/logs", headers={"X-API-Key": "test-key"})
    assert status == 404, "worker logs are on the admin socket only"


def test_logs_follow(host: GpudHost) -> None:
    session_id = new_session(lambda *a: run_subprocess(host.socket, *a))
    follower = subprocess.Popen(
        [*gpuctl_command(), "--socket", host.socket, "logs", session_id, "-f", "-o", "json"],
        stdout=subprocess.PIPE,
        text=True,
        env=gpuctl_env(),
        cwd=REPO,
    )
    assert follower.stdout is not None
    run_subprocess(host.socket, "submit", MODEL_ID, "stream", "--session", session_id, "--meta", "fail=true")
    seen = []
    while not seen or "RuntimeError" not in seen[-1]["line"]:
        seen.append(json.loads(follower.stdout.readline()))  # lines that came after -f started
    assert follower.poll() is None, "logs -f keeps following while the worker lives"
    assert run_subprocess(host.socket, "sessions", "kill", session_id).code == 0
    assert follower.wait(timeout=20) == 0, "logs -f ends when the worker does"


# ---- GPUs, reload, models -----------------------------------------------------------------------------------------


def test_gpu_drain_undrain(gpuctl: Gpuctl) -> None:
    drained = gpuctl("gpu", "drain", "0", "-o", "json").json()
    assert drained["id"] == 0 and drained["drained"] is True
    assert "drained" in gpuctl("gpus").stdout.splitlines()[1]
    busy = gpuctl("submit", MODEL_ID, "oneoff", "--oneoff")
    assert busy.code == 1 and "no_gpu_available" in busy.stderr
    assert gpuctl("gpu", "undrain", "0").stdout == "GPU 0 undrained: takes new leases\n"
    assert gpuctl("gpu", "drain", "1").stdout.startswith("GPU 1 drained")
    assert gpuctl("gpu", "undrain", "1", "-o", "json").json()["drained"] is False
    bad = gpuctl("gpu", "drain", "x")
    assert bad.code == 1 and "invalid_gpu_id" in bad.stderr


def test_reload(gpuctl: Gpuctl, host: GpudHost) -> None:
    body = gpuctl("reload", "-o", "json")
    assert body.code == 0 and body.json()["reloaded"] is True
    assert "reloaded:         ok" in gpuctl("reload").stdout
    presets = host.base / "models.yaml"
    good = presets.read_text()
    presets.write_text("models:\n  m:\n    p: {command: [x]}\n")
    try:
        refused = gpuctl("reload")
        assert refused.code == 1 and "reload failed" in refused.stdout and "docker_image" in refused.stdout
        refused_json = gpuctl("reload", "-o", "json")
        assert refused_json.code == 1 and refused_json.json()["reloaded"] is False
    finally:
        presets.write_text(good)
    assert gpuctl("reload").code == 0


def test_models_fetch_verify_rm(gpuctl: Gpuctl, host: GpudHost) -> None:
    fetched = gpuctl("models", "fetch", FETCH_MODEL, "-o", "json")
    assert fetched.code == 0, fetched.stderr
    assert fetched.json()["complete"] is True and fetched.json()["size_bytes"] == 1100
    assert f"model:     {FETCH_MODEL}" in gpuctl("models", "fetch", FETCH_MODEL).stdout
    listed = gpuctl("models", "ls", "-o", "json").json()["models"]
    assert FETCH_MODEL in [m["model_id"] for m in listed]
    assert any(line.split()[:3] == [FETCH_MODEL, "1.1Ki", "yes"] for line in gpuctl("models", "ls").stdout.splitlines())
    verified = gpuctl("models", "verify", FETCH_MODEL, "-o", "json").json()
    assert verified["ok"] is True and verified["files_checked"] >= 1
    assert "verify:        ok" in gpuctl("models", "verify", FETCH_MODEL).stdout
    stored = next(p for p in (host.base / "models" / FETCH_MODEL).iterdir() if not p.name.startswith("."))
    stored.write_bytes(b"tampered")
    bad = gpuctl("models", "verify", FETCH_MODEL, "-o", "json")
    assert bad.code == 1 and bad.json()["ok"] is False and bad.json()["problems"]
    removed = gpuctl("models", "rm", FETCH_MODEL, "-o", "json")
    assert removed.code == 0 and removed.json() == {"model_id": FETCH_MODEL, "removed": True}
    assert gpuctl("models", "rm", FETCH_MODEL).code == 1  # not cached any more: the daemon's 404
    assert FETCH_MODEL not in [m["model_id"] for m in gpuctl("models", "ls", "-o", "json").json()["models"]]


# ---- resume, errors, socket choice, colour, imports ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["submit", "tasks events"])
def test_broken_stream_resumes_with_last_event_id(command: str, host: GpudHost) -> None:
    """A proxy tears the stream mid-frame; gpuctl re-attaches after the last whole event: no loss, no repeats."""
    proxy = CuttingProxy(host.socket, host.base / f"proxy-{command.replace(' ', '-')}.sock")
    try:
        if command == "submit":
            args = ["submit", MODEL_ID, "stream", "--meta", "max_tokens=8", "--meta", "delay=0.05"]
        else:
            done = run_subprocess(host.socket, "submit", MODEL_ID, "stream", "--meta", "max_tokens=8", "-o", "json")
            args = ["tasks", "events", done.json_lines()[0]["data"]["task_id"], "--text"]
        result = run_subprocess(str(proxy.path), *args)
    finally:
        proxy.close()
    assert result.code == 0, result.stderr
    assert result.stdout == expected_text(8) + "\n"
    assert proxy.cut_done.is_set()
    resumed = [r for r in proxy.requests if r.startswith(b"GET /api/tasks/") and b"/events" in r.split(b"\r\n")[0]]
    assert resumed, proxy.requests
    header = next(line for line in resumed[-1].split(b"\r\n") if line.lower().startswith(b"last-event-id:"))
    assert int(header.split(b":")[1]) > 0


@pytest.mark.parametrize("runner", [run_in_process, run_subprocess])
def test_no_daemon(runner: Callable[..., Result], tmp_path: Path) -> None:
    result = runner(str(tmp_path / "missing.sock"), "sessions", "ls")
    assert result.code == 3 and result.stdout == ""
    assert f"cannot reach gpud at {tmp_path / 'missing.sock'} (from --socket)" in result.stderr
    assert "is gpud running? try: systemctl status gpud" in result.stderr


# Runs gpuctl's real main() in a child that drops to uid/gid 65534 after importing it: the interpreter lives under
# /root (0700) here, so it cannot be exec'd as nobody, but the socket's permissions are checked at connect().
_AS_NOBODY = (
    "import os, sys\n"
    "import gpuctl.cli\n"
    "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    "sys.argv = ['gpuctl', *sys.argv[1:]]\n"
    "gpuctl.cli.main()\n"
)


def _as_nobody(socket_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """gpuctl as uid/gid 65534 (the tests run as root), so the socket's mode applies."""
    return subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, "--socket", socket_path, *args],
        capture_output=True,
        text=True,
        env=gpuctl_env(),
        cwd=REPO,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run gpuctl as another user")
def test_permission_denied(host: GpudHost) -> None:
    base = Path(tempfile.mkdtemp(prefix="gctl-perm-", dir="/tmp"))
    base.chmod(0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path = base / "root-only.sock"
        listener.bind(str(path))
        listener.listen(1)
        path.chmod(0o600)
        for target in (str(path), host.socket):  # a bare 0600 socket, and the daemon's own (0660 root:root)
            result = _as_nobody(target, "status")
            assert result.returncode == 3, result.stderr
            assert f"permission denied on the admin socket {target}" in result.stderr
            assert "add your user to group gpud" in result.stderr
    finally:
        listener.close()
        shutil.rmtree(base, ignore_errors=True)


def test_api_error_shows_code_and_message(gpuctl: Gpuctl) -> None:
    result = gpuctl("sessions", "kill", "no-such-session", "-o", "json")
    assert result.code == 1 and result.stdout == ""
    assert result.stderr.strip() == "gpuctl: session_not_found: no session 'no-such-session' (HTTP 404)"


def test_socket_from_environment_and_dev_fallback(host: GpudHost, tmp_path: Path) -> None:
    proc = subprocess.run(
        [*gpuctl_command(), "status"],
        capture_output=True,
        text=True,
        env=gpuctl_env({"GPUD_SOCKET": host.socket}),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and f"{host.socket} (GPUD_SOCKET)" in proc.stdout
    runtime_dir = tmp_path / "xdg"
    (runtime_dir / "gpud").mkdir(parents=True)
    (runtime_dir / "gpud" / "gpud.sock").symlink_to(host.socket)
    if os.path.exists(DEFAULT_SOCKET):
        pytest.skip(f"{DEFAULT_SOCKET} exists here, so the dev fallback is not used")
    choice = resolve_socket(None, {"XDG_RUNTIME_DIR": str(runtime_dir)})
    assert choice == SocketChoice(str(runtime_dir / "gpud" / "gpud.sock"), "dev")
    assert resolve_socket(None, {"XDG_RUNTIME_DIR": str(tmp_path / "none")}).source == "default"
    env = gpuctl_env({"XDG_RUNTIME_DIR": str(runtime_dir)})
    dev = subprocess.run(
        [*gpuctl_command(), "status"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert dev.returncode == 0 and "(dev)" in dev.stdout


def _on_a_terminal(socket_path: str, env: dict[str, str]) -> str:
    """gpuctl's stdout when it is a real pseudo-terminal."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*gpuctl_command(), "--socket", socket_path, "status"], stdout=follower, env=gpuctl_env(env), cwd=REPO
    )
    os.close(follower)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while data := os.read(leader, 4096):
            chunks.append(data)
    os.close(leader)
    assert proc.wait(30) == 0
    return b"".join(chunks).decode()


def test_colour_only_on_a_terminal_and_never_with_no_color(host: GpudHost) -> None:
    assert "\x1b[32mok\x1b[0m" in _on_a_terminal(host.socket, {})
    assert "\x1b[" not in _on_a_terminal(host.socket, {"NO_COLOR": "1"})
    assert "\x1b[" not in run_subprocess(host.socket, "status").stdout  # a pipe: no colour


def test_simple_commands_do_not_import_the_server_stack(host: GpudHost) -> None:
    """Startup stays small: a JSON listing imports no aiohttp, asyncio, yaml, http.client, gpud server modules,
    nor gpuctl's table renderer."""
    code = (
        "import sys; from gpuctl.cli import main\n"
        "sys.argv = ['gpuctl', '--socket', sys.argv[1], 'sessions', 'ls', '-o', 'json']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'asyncio', 'yaml', 'multidict', 'ssl')"
        " or m in ('http.client', 'gpuctl.render') or (m.startswith('gpud.') and m != 'gpud'))\n"
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, host.socket], capture_output=True, text=True, cwd=REPO, timeout=60, check=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout + proc.stderr
