"""gpuctl for people, against a real gpud (process runtime): id prefixes, `-o` before the subcommand, shell
completion, `--watch`, list filters, and `logs` showing what an SDK worker wrote through `ctx.log`.

Each test runs gpuctl as a real process (the console script), as an operator would; a few also through click's
runner (same code in-process) where the two could differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner

from gpuctl.cli import cli
from tests.daemonproc import REPO
from tests.integration.gpuctl_env import (
    MODEL_ID,
    TOKENS,
    GpudHost,
    end_live_sessions,
    gpuctl_command,
    gpuctl_env,
    run_gpuctl,
    start_host,
)


@dataclass
class Result:
    """What one gpuctl run gave."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout as one JSON document."""
        return json.loads(self.stdout)

    def json_lines(self) -> list[Any]:
        """stdout as one JSON value per line."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


Gpuctl = Callable[..., Result]


@pytest.fixture(scope="module")
def host() -> Iterator[GpudHost]:
    """One gpud (process runtime, the example workers, a cached model) for the module."""
    started = start_host()
    yield started
    started.close()


@pytest.fixture(autouse=True)
def clean(host: GpudHost) -> Iterator[None]:
    """Each test starts with no live session (a session holds the only `low` GPU)."""
    yield
    end_live_sessions(host)


def run(socket: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    """gpuctl as a real process against `socket`."""
    proc = run_gpuctl(socket, args, env=env, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_in_process(socket: str, *args: str) -> Result:
    """gpuctl through click's runner (same process)."""
    result = CliRunner().invoke(cli, ["--socket", socket, *args], env={"GPUD_SOCKET": None, "NO_COLOR": None})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


@pytest.fixture(params=["subprocess", "runner"])
def gpuctl(request: pytest.FixtureRequest, host: GpudHost) -> Gpuctl:
    """gpuctl bound to the module's daemon: as a real process, and through click's runner."""
    runner = run if request.param == "subprocess" else run_in_process
    return lambda *args: runner(host.socket, *args)


def expected_text(count: int) -> str:
    """What the streaming example worker says for max_tokens=count."""
    words = TOKENS.split()
    return " ".join(words[i % len(words)] for i in range(count))


def submit(host: GpudHost, *args: str) -> list[dict[str, Any]]:
    """Run a task to its end (a session task unless args say otherwise); its events."""
    result = run(host.socket, "submit", MODEL_ID, *args, "-o", "json")
    assert result.code == 0, result.stderr
    return result.json_lines()


def session_of(events: list[dict[str, Any]]) -> str:
    """The session a task's events name."""
    return str(next(e["data"]["session_id"] for e in events if e["event"] == "connection"))


# ---- id prefixes ----------------------------------------------------------------------------------------------------


def test_every_id_argument_takes_the_12_characters_a_table_shows(host: GpudHost, gpuctl: Gpuctl) -> None:
    first = submit(host, "stream", "--meta", "max_tokens=2")
    session_id, task_id = session_of(first), first[0]["data"]["task_id"]
    short_session, short_task = session_id[:12], task_id[:12]
    listed = gpuctl("sessions", "ls").stdout
    assert short_session in listed and session_id not in listed  # what a person copies from the table
    assert gpuctl("sessions", "show", short_session, "-o", "json").json()["session_id"] == session_id
    assert gpuctl("sessions", "keepalive", short_session, "-o", "json").json()["session_id"] == session_id
    assert gpuctl("tasks", "show", short_task, "-o", "json").json()["task_id"] == task_id
    assert gpuctl("tasks", "events", short_task, "--text").stdout == expected_text(2) + "\n"
    # A prefix of the session queues there, like its full id.
    again = gpuctl("submit", MODEL_ID, "stream", "--session", short_session, "--meta", "max_tokens=3")
    assert again.code == 0 and again.stdout == expected_text(3) + "\n", again.stderr
    logged = gpuctl("logs", short_session, "-o", "json").json_lines()
    assert any(entry.get("task_id") == task_id for entry in logged)
    done = gpuctl("tasks", "cancel", short_task)  # resolved, then the daemon's own answer: it has finished
    assert done.code == 1 and "task_finished" in done.stderr
    killed = gpuctl("sessions", "kill", short_session, "-o", "json")
    assert killed.code == 0 and killed.json()["session_id"] == session_id and killed.json()["state"] == "stopped"


def test_an_ambiguous_prefix_is_a_usage_error_listing_the_candidates(host: GpudHost) -> None:
    session_id = session_of(submit(host, "stream", "--meta", "max_tokens=1"))
    tasks: dict[str, list[str]] = {}
    # Random hex ids: within a few tasks, two share their first character.
    while not any(len(ids) > 1 for ids in tasks.values()):
        events = submit(host, "stream", "--session", session_id, "--meta", "max_tokens=1")
        tasks.setdefault(events[0]["data"]["task_id"][0], []).append(events[0]["data"]["task_id"])
        assert sum(len(ids) for ids in tasks.values()) < 40
    prefix, ids = next((p, ids) for p, ids in tasks.items() if len(ids) > 1)
    for command in (["tasks", "show", prefix], ["tasks", "events", prefix], ["tasks", "cancel", prefix]):
        result = run(host.socket, *command)
        assert result.code == 2, (command, result)
        assert result.stdout == ""
        assert f"gpuctl: ambiguous task id '{prefix}':" in result.stderr and "give more of it" in result.stderr
        assert all(task_id in result.stderr for task_id in ids)
    unknown = run(host.socket, "tasks", "show", "zz-no-such-task")
    assert unknown.code == 1 and "(HTTP 404)" in unknown.stderr  # no candidate: the daemon's own answer
    assert run(host.socket, "sessions", "show", "zz").code == 1


# ---- -o before the subcommand ---------------------------------------------------------------------------------------


def test_output_format_may_come_before_the_subcommand(gpuctl: Gpuctl) -> None:
    listed = gpuctl("-o", "json", "sessions", "ls")
    assert listed.code == 0 and isinstance(listed.json()["sessions"], list)
    assert gpuctl("--output", "json", "status").json()["status"] == "ok"
    assert gpuctl("-o", "json", "gpus", "-o", "table").stdout.split()[0] == "ID"  # the command's own -o wins
    assert gpuctl("gpus").stdout.split()[0] == "ID"  # and the default stays a table
    assert gpuctl("-o", "yaml", "gpus").code == 2


# ---- shell completion -----------------------------------------------------------------------------------------------


def _complete(host: GpudHost, words: str) -> list[str]:
    """What gpuctl offers bash for the last word of `words` (click's bash protocol: `type,value` lines)."""
    env = gpuctl_env(
        {"_GPUCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
    )
    proc = subprocess.run(gpuctl_command(), capture_output=True, text=True, env=env, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return [line.split(",", 1)[1] for line in proc.stdout.splitlines() if line]


def test_completion_scripts_and_what_they_complete(host: GpudHost) -> None:
    bash = run(host.socket, "completion", "bash")
    assert bash.code == 0 and "_GPUCTL_COMPLETE=bash_complete" in bash.stdout
    registered = subprocess.run(
        ["bash", "-c", 'eval "$(gpuctl completion bash)" && complete -p gpuctl'],
        capture_output=True,
        text=True,
        env=gpuctl_env({"PATH": f"{os.path.dirname(gpuctl_command()[0])}:{os.environ['PATH']}"}),
        timeout=30,
        check=False,
    )
    assert registered.returncode == 0 and "_gpuctl_completion" in registered.stdout, registered.stderr
    for shell, marker in (("zsh", "#compdef gpuctl"), ("fish", "complete --no-files --command gpuctl")):
        script = run(host.socket, "completion", shell)
        assert script.code == 0 and marker in script.stdout
        if shutil.which(shell):  # the script parses in that shell
            check = subprocess.run([shell, "-n"], input=script.stdout, text=True, capture_output=True, timeout=30)
            assert check.returncode == 0, check.stderr
    assert run(host.socket, "completion", "tcsh").code == 2
    assert "sessions" in _complete(host, "gpuctl ses")
    assert {"--state", "--model", "--watch"} <= set(_complete(host, "gpuctl sessions ls --"))
    session_id = session_of(submit(host, "stream", "--meta", "max_tokens=1"))
    offered = _complete(host, f"gpuctl --socket {host.socket} sessions show {session_id[:3]}")
    assert session_id in offered
    assert _complete(host, "gpuctl --socket /nonexistent/gpud.sock sessions show ") == []  # no daemon: no ids


# ---- --watch --------------------------------------------------------------------------------------------------------


def test_watch_redraws_until_the_count_or_ctrl_c(host: GpudHost) -> None:
    once = run(host.socket, "status")
    assert once.code == 0 and once.stdout.startswith("status:") and "every " not in once.stdout
    frames = run(host.socket, "status", "--watch", "0.1", "--count", "3")
    assert frames.code == 0, frames.stderr
    assert frames.stdout.count("every 0.1s: gpuctl status") == 3 and frames.stdout.count("status:   ok") == 3
    assert "\x1b[" not in frames.stdout  # a pipe gets frames one after another, no screen clearing
    lines = run(host.socket, "sessions", "ls", "-w", "0.1", "--count", "2", "-o", "json").json_lines()
    assert len(lines) == 2 and all(isinstance(line["sessions"], list) for line in lines)
    proc = subprocess.Popen(
        [*gpuctl_command(), "--socket", host.socket, "sessions", "ls", "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=gpuctl_env(),
        cwd=REPO,
    )
    assert proc.stdout is not None
    headers = 0
    while headers < 2:
        headers += proc.stdout.readline().startswith("every 0.2s: gpuctl sessions ls")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err


def test_watch_on_a_terminal_clears_the_screen_and_survives_a_missing_daemon(host: GpudHost) -> None:
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*gpuctl_command(), "--socket", host.socket, "status", "-w", "0.1", "--count", "2"],
        stdout=follower,
        env=gpuctl_env(),
        cwd=REPO,
    )
    os.close(follower)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while data := os.read(leader, 4096):
            chunks.append(data)
    os.close(leader)
    assert proc.wait(30) == 0
    assert b"".join(chunks).decode().count("\x1b[H\x1b[2J") == 2
    missing = str(host.base / "missing.sock")
    table = run(missing, "status", "--watch", "0.1", "--count", "2")
    assert table.code == 0 and table.stdout.count(f"cannot reach gpud at {missing}") == 2  # keeps watching
    assert run(missing, "status", "--watch", "0.1", "--count", "2", "-o", "json").code == 3  # scripts get the code


# ---- filters --------------------------------------------------------------------------------------------------------


def test_list_filters_by_state_status_and_model(host: GpudHost, gpuctl: Gpuctl) -> None:
    events = submit(host, "stream", "--meta", "max_tokens=1")
    session_id, task_id = session_of(events), events[0]["data"]["task_id"]
    failed = run(host.socket, "submit", MODEL_ID, "oneoff", "--oneoff", "--difficulty", "high", "--meta", "exit_code=3")
    assert failed.code == 4

    def sessions(*args: str) -> list[str]:
        return [s["session_id"] for s in gpuctl("sessions", "ls", *args, "-o", "json").json()["sessions"]]

    def tasks(*args: str) -> list[dict[str, Any]]:
        return list(gpuctl("tasks", "ls", *args, "-o", "json").json()["tasks"])

    assert sessions("--state", "live") == [session_id]
    assert session_id in sessions("--state", "ready", "--state", "stopped", "--model", MODEL_ID)
    assert session_id not in sessions("--state", "stopped") and sessions("--model", "other-model") == []
    assert {t["status"] for t in tasks("--status", "failed")} == {"failed"}
    assert task_id in [t["task_id"] for t in tasks("--status", "completed", "--model", MODEL_ID)]
    assert tasks("--status", "active") == [] and tasks("--model", "other-model") == []
    table = gpuctl("tasks", "ls", "--status", "failed").stdout.splitlines()
    assert table[0].split()[0] == "TASK" and len(table) >= 2 and all("failed" in row for row in table[1:])
    assert gpuctl("sessions", "ls", "--state", "asleep").code == 2


# ---- logs: what the SDK worker wrote --------------------------------------------------------------------------------


def test_logs_show_the_sdk_workers_log_lines_in_order(host: GpudHost) -> None:
    events = submit(host, "stream", "--meta", "prompt=first", "--meta", "max_tokens=2")
    session_id, first_task = session_of(events), events[0]["data"]["task_id"]
    failed = run(host.socket, "submit", MODEL_ID, "stream", "--session", session_id, "--meta", "fail=true")
    assert failed.code == 4
    table = run(host.socket, "logs", session_id)
    assert table.code == 0 and table.stdout == ""  # ctx.log's default stream, like the traceback, is stderr
    assert "prompt='first' max_tokens=2" in table.stderr
    entries = run(host.socket, "logs", session_id, "-o", "json").json_lines()
    lines = [entry["line"] for entry in entries]
    first = lines.index("prompt='first' max_tokens=2")
    assert entries[first] == {"stream": "stderr", "line": "prompt='first' max_tokens=2", "task_id": first_task}
    second = lines.index("prompt='' max_tokens=16")  # the failing task's ctx.log line ...
    assert first < second < lines.index("RuntimeError: failure requested by metadata.fail")  # ... then its traceback
    assert "task_id" not in entries[-1]  # container output carries no task id
    text = host.daemon.request("GET", f"/api/sessions/{session_id}/logs?tail=2", admin=True)[1]
    assert text.endswith("RuntimeError: failure requested by metadata.fail\n")


def test_logs_follow_shows_new_log_lines_live_and_ends_with_the_worker(host: GpudHost) -> None:
    events = submit(host, "stream", "--meta", "prompt=before", "--meta", "max_tokens=1")
    session_id = session_of(events)
    follower = subprocess.Popen(
        [*gpuctl_command(), "--socket", host.socket, "logs", session_id[:12], "-f", "--tail", "1", "-o", "json"],
        stdout=subprocess.PIPE,
        text=True,
        env=gpuctl_env(),
        cwd=REPO,
    )
    assert follower.stdout is not None
    try:
        # The last line so far first: the follower is attached before the next task runs.
        assert json.loads(follower.stdout.readline())["line"] == "prompt='before' max_tokens=1"
        events = submit(host, "stream", "--session", session_id, "--meta", "prompt=live", "--meta", "max_tokens=1")
        entry = json.loads(follower.stdout.readline())
        assert entry == {
            "stream": "stderr",
            "line": "prompt='live' max_tokens=1",
            "task_id": events[0]["data"]["task_id"],
        }
        assert follower.poll() is None
        assert run(host.socket, "sessions", "kill", session_id).code == 0
        assert follower.wait(timeout=20) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    gone = host.daemon.request("GET", f"/api/sessions/{session_id}/logs", admin=True)
    assert gone[0] == 410 and gone[1]["error"]["code"] == "session_logs_gone"
