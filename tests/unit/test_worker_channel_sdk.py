"""WorkerChannel against a REAL worker process: examples/workers/stream_text.py importing the SDK as gpud_worker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpud.worker import sdk_source_path
from gpud.worker.channel import WorkerChannel
from gpud.worker.messages import WorkerBusy, WorkerEvent, WorkerGone, WorkerSetupFailed
from gpud.worker.protocol import ENV_SOCKET, MAX_MESSAGE_SIZE

REPO = Path(__file__).resolve().parents[2]
STREAM_TEXT = REPO / "examples" / "workers" / "stream_text.py"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]
WORKER_UID = 2_000_065_534  # a worker uid as gpud's WorkerIds would give one


@pytest.fixture
def sdk_dir(tmp_path: Path) -> Path:
    """The SDK as containers see it: a directory on PYTHONPATH holding gpud_worker.py (and nothing of gpud)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(sdk_source_path(), lib / "gpud_worker.py")
    return lib


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokens.txt").write_text(" ".join(WORDS) + "\n")
    return model


class Worker:
    """A started channel plus the worker subprocess connected to it."""

    def __init__(self, channel: WorkerChannel, proc: asyncio.subprocess.Process) -> None:
        self.channel = channel
        self.proc = proc


def own_channel(socket_dir: Path, **kwargs: Any) -> WorkerChannel:
    """A channel whose worker runs as this test's own user (the worker subprocesses here are not switched)."""
    return WorkerChannel(socket_dir, uid=os.geteuid(), gid=os.getegid(), **kwargs)


async def spawn(tmp_path: Path, sdk_dir: Path, model_dir: Path | None, script: Path = STREAM_TEXT) -> Worker:
    channel = own_channel(tmp_path / "sock")
    await channel.start()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(sdk_dir),  # only the SDK copy: proves it does not import gpud
        ENV_SOCKET: str(channel.socket_path),
    }
    if model_dir is not None:
        env["MODEL_PATH"] = str(model_dir)
    # -S: no site-packages at all (so not gpud's editable install); PYTHONPATH holds only the SDK copy, so the
    # worker sees what a container sees and an accidental `import gpud` in the SDK would fail here.
    proc = await asyncio.create_subprocess_exec(sys.executable, "-S", str(script), env=env)
    return Worker(channel, proc)


@pytest.fixture
async def worker(tmp_path: Path, sdk_dir: Path, model_dir: Path) -> AsyncIterator[Worker]:
    w = await spawn(tmp_path, sdk_dir, model_dir)
    try:
        yield w
    finally:
        await w.channel.close()
        with contextlib.suppress(ProcessLookupError):
            w.proc.kill()
        await w.proc.wait()


async def collect(channel: WorkerChannel, task_id: str, input: dict[str, Any]) -> list[WorkerEvent]:
    return [event async for event in channel.run_task(task_id, input)]


def text_of(events: list[WorkerEvent]) -> str:
    return "".join(e.data["delta"] for e in events if e.type == "text_delta")


async def test_ready_reports_load_count_and_two_tasks_reuse_the_load(worker: Worker) -> None:
    ready = await worker.channel.wait_ready(30)
    assert ready.info["load_count"] == 1
    assert ready.pid == worker.proc.pid
    assert ready.protocol == 1
    assert "load_seconds" in ready.info

    for n, task_id in enumerate(["t1", "t2"]):
        events = await collect(worker.channel, task_id, {"prompt": f"p{n}", "max_tokens": 4, "delay": 0})
        assert events[-1].type == "done"
        assert events[-1].data["status"] == "completed"
        assert text_of(events) == "alpha beta gamma delta"
        text = [e for e in events if e.type == "text"]
        assert text[0].data["text"] == "alpha beta gamma delta"
        result = next(e for e in events if e.type == "result")
        assert result.data["load_count"] == 1  # the model was not loaded again
        assert result.data["prompt"] == f"p{n}"
        assert all(e.task_id == task_id for e in events)
        logs = [e for e in events if e.type == "log"]
        assert logs and f"p{n}" in logs[0].data["line"]
    assert worker.channel.running_task is None


async def test_deltas_arrive_before_the_task_ends(worker: Worker) -> None:
    await worker.channel.wait_ready(30)
    kinds: list[str] = []
    async for event in worker.channel.run_task("t", {"max_tokens": 20, "delay": 0.2}):
        kinds.append(event.type)
        if event.type == "text_delta" and kinds.count("text_delta") == 1:
            # Still running when its first delta arrives: a cancel now lands mid-task.
            assert worker.channel.running_task == "t"
            await worker.channel.cancel("t")
    assert kinds[-1] == "done"
    assert 1 <= kinds.count("text_delta") < 20


async def test_cancel_stops_the_running_task_and_the_worker_stays_usable(worker: Worker) -> None:
    await worker.channel.wait_ready(30)
    events: list[WorkerEvent] = []
    async for event in worker.channel.run_task("long", {"max_tokens": 1000, "delay": 0.05}):
        events.append(event)
        if event.type == "text_delta" and len(events) >= 2:
            await worker.channel.cancel("long")
    assert events[-1].data["status"] == "cancelled"
    assert len([e for e in events if e.type == "text_delta"]) < 20  # of 1000
    assert not any(e.type == "text" for e in events)
    after = await collect(worker.channel, "next", {"max_tokens": 2, "delay": 0})
    assert after[-1].data["status"] == "completed"
    assert next(e for e in after if e.type == "result").data["load_count"] == 1


async def test_ignore_cancel_is_detectable_by_a_timeout(worker: Worker) -> None:
    await worker.channel.wait_ready(30)
    events = worker.channel.run_task("stuck", {"max_tokens": 40, "delay": 0.25, "ignore_cancel": True})
    await worker.channel.cancel("stuck")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            async for _ in events:
                pass
    assert worker.channel.running_task == "stuck"  # still busy: the caller must restart the worker


async def test_fail_reports_an_error_without_crashing(worker: Worker) -> None:
    await worker.channel.wait_ready(30)
    events = await collect(worker.channel, "f", {"max_tokens": 4, "delay": 0, "fail": True})
    error = next(e for e in events if e.type == "error")
    assert "metadata.fail" in error.data["message"]
    assert error.data["code"] == "RuntimeError"
    assert events[-1].data["status"] == "failed"
    assert worker.proc.returncode is None
    assert (await collect(worker.channel, "ok", {"max_tokens": 1, "delay": 0}))[-1].data["status"] == "completed"


async def test_crash_mid_task_surfaces_as_worker_gone(worker: Worker) -> None:
    await worker.channel.wait_ready(30)
    deltas = 0
    with pytest.raises(WorkerGone):
        async for event in worker.channel.run_task("c", {"max_tokens": 6, "delay": 0, "crash": True}):
            deltas += event.type == "text_delta"
    assert deltas == 3  # it crashed half way, after streaming what it had
    assert await worker.proc.wait() == 3
    assert worker.channel.gone
    with pytest.raises(WorkerGone):
        await worker.channel.ping(1)


async def test_ping_pong_also_while_a_task_runs(worker: Worker) -> None:
    await worker.channel.wait_ready(30)
    assert await worker.channel.ping(5) >= 0
    events = worker.channel.run_task("busy", {"max_tokens": 200, "delay": 0.1})
    first = await anext(events)
    assert first.type == "log"
    await worker.channel.ping(5)  # answered by the SDK's reader thread while predict runs
    assert worker.channel.running_task == "busy"
    await worker.channel.cancel("busy")
    rest = [e async for e in events]
    assert rest[-1].data["status"] == "cancelled"


async def test_setup_failure_without_model_is_reported(tmp_path: Path, sdk_dir: Path) -> None:
    w = await spawn(tmp_path, sdk_dir, tmp_path / "missing-model")
    try:
        with pytest.raises(WorkerSetupFailed, match=r"tokens\.txt"):
            await w.channel.wait_ready(30)
        assert await w.proc.wait() == 1
    finally:
        await w.channel.close()


async def test_second_task_while_busy_is_refused(worker: Worker) -> None:
    await worker.channel.wait_ready(30)
    events = worker.channel.run_task("a", {"max_tokens": 3, "delay": 0.05})
    await anext(events)
    with pytest.raises(WorkerBusy):
        await anext(worker.channel.run_task("b", {}))
    assert [e async for e in events][-1].data["status"] == "completed"


class RawWorker:
    """A hand-written worker on a raw socket, to send what the SDK never would."""

    def __init__(self, path: Path, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
        self.sock = sock
        self.sock.setblocking(False)

    @classmethod
    def as_uid(cls, uid: int, path: Path) -> RawWorker:
        """Connected from a child running as uid:uid (SO_PEERCRED records the connecting process), handed back."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        code = (
            "import os, socket\n"
            f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.connect({str(path)!r})\n"
            f"socket.send_fds(socket.socket(fileno={child.fileno()}), [b'x'], [s.fileno()])\n"
        )
        proc = subprocess.run([sys.executable, "-S", "-c", code], pass_fds=[child.fileno()], timeout=30, check=False)
        child.close()
        assert proc.returncode == 0
        _, fds, _, _ = socket.recv_fds(parent, 1, 1)
        parent.close()
        return cls(path, socket.socket(fileno=fds[0]))

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv_message(self) -> dict[str, Any]:
        buf = b""
        while not buf.endswith(b"\n"):
            buf += await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        return json.loads(buf)


async def test_malformed_and_oversized_messages_are_skipped(tmp_path: Path) -> None:
    channel = own_channel(tmp_path / "sock", max_message=1024)
    await channel.start()
    raw = RawWorker(channel.socket_path)
    try:
        await raw.send(b'{"type":"hello","protocol":1,"pid":1}\n{"type":"ready","info":{}}\n')
        await channel.wait_ready(5)
        events = channel.run_task("t", {})
        task = asyncio.ensure_future(anext(events))
        assert (await raw.recv_message())["type"] == "task"
        await raw.send(b"this is not json\n")
        first = await task
        assert first.type == "log" and first.data["stream"] == "gpud"
        assert "not valid UTF-8 JSON" in first.data["line"]
        # Over the limit, sent in pieces: reported once, skipped up to its newline, then the stream resyncs.
        await raw.send(b'{"type":"text_delta","task_id":"t","delta":"' + b"x" * 700)
        await raw.send(b"y" * 700 + b'"}\n[1,2]\n')
        second, third = await anext(events), await anext(events)
        assert "over 1024" in second.data["line"] or "exceeds 1024" in second.data["line"]
        assert "JSON object" in third.data["line"]
        await raw.send(b'{"type":"text_delta","task_id":"t","delta":"ok"}\n')
        await raw.send(b'{"type":"done","task_id":"t","status":"completed"}\n')
        rest = [e async for e in events]
        assert [e.type for e in rest] == ["text_delta", "done"]
        assert channel.protocol_errors == 3
    finally:
        raw.sock.close()
        await channel.close()
    assert not channel.socket_path.exists()


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A world-traversable directory (pytest's tmp dirs are root's 0700), so only the modes under test decide."""
    base = Path(tempfile.mkdtemp(prefix="gpud-chan-", dir="/var/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


async def connect_as(uid: int, path: Path) -> str:
    """connect() to `path` from a child process running as uid:uid with no groups; what happened, as a word."""
    code = (
        "import os, socket, sys\n"
        f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(path)!r})\n"
        "except OSError as e:\n"
        "    print(type(e).__name__); sys.exit()\n"
        "print('closed' if s.recv(1) == b'' else 'open')\n"
    )
    # In a thread: the channel under test lives on this event loop and must answer meanwhile.
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=30)
    done = await asyncio.to_thread(run, [sys.executable, "-S", "-c", code])
    return done.stdout.strip() or done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="handing the socket to another uid needs root")
async def test_socket_and_directory_belong_to_the_worker_uid_alone(open_base: Path) -> None:
    channel = WorkerChannel(open_base / "sock", uid=WORKER_UID, gid=WORKER_UID)
    await channel.start()
    try:
        for path, mode in ((channel.socket_path, 0o600), (channel.socket_dir, 0o700)):
            info = path.stat()
            assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (mode, WORKER_UID, WORKER_UID)
        assert MAX_MESSAGE_SIZE >= 1024 * 1024
        # Another unprivileged uid cannot even reach it; root can, but is not the worker: refused.
        assert await connect_as(65534, channel.socket_path) == "PermissionError"
        assert await connect_as(0, channel.socket_path) == "closed"
        assert channel.refused_peers == 1
    finally:
        await channel.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as other uids needs root")
async def test_a_wrong_peer_is_refused_and_the_real_worker_still_gets_the_slot(open_base: Path) -> None:
    channel = WorkerChannel(open_base / "sock", uid=WORKER_UID, gid=WORKER_UID)
    await channel.start()
    # Open the modes up, as a mistaken operator might: SO_PEERCRED must still tell the worker from the rest.
    channel.socket_dir.chmod(0o777)
    channel.socket_path.chmod(0o666)
    try:
        assert [await connect_as(uid, channel.socket_path) for uid in (65534, 0, WORKER_UID + 1)] == ["closed"] * 3
        assert channel.refused_peers == 3
        worker = await asyncio.to_thread(RawWorker.as_uid, WORKER_UID, channel.socket_path)
        await worker.send(b'{"type":"hello","protocol":1,"pid":1}\n{"type":"ready","info":{}}\n')
        await channel.wait_ready(5)
        assert await connect_as(WORKER_UID, channel.socket_path) == "closed"  # the same uid, but the slot is taken
        assert channel.refused_peers == 3  # that one is the one-worker rule, not a wrong peer
        events = channel.run_task("t", {})
        first = asyncio.ensure_future(anext(events))
        assert (await worker.recv_message())["type"] == "task"
        await worker.send(b'{"type":"done","task_id":"t","status":"completed"}\n')
        assert (await first).type == "done"
        worker.sock.close()
    finally:
        await channel.close()


async def test_version_mismatch_fails_ready(tmp_path: Path) -> None:
    channel = own_channel(tmp_path / "sock")
    await channel.start()
    raw = RawWorker(channel.socket_path)
    try:
        await raw.send(b'{"type":"hello","protocol":99,"pid":1}\n')
        with pytest.raises(WorkerSetupFailed, match="protocol 99"):
            await channel.wait_ready(5)
        assert (await raw.recv_message())["type"] == "shutdown"
    finally:
        raw.sock.close()
        await channel.close()


async def run_script(script: Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-S",
        str(script),
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def input_file(tmp_path: Path, value: dict[str, Any], name: str = "input.json") -> str:
    """A task input file as gpud writes it (read-only to its owner), for GPUD_TASK_INPUT_FILE."""
    path = tmp_path / name
    path.write_text(json.dumps(value))
    path.chmod(0o400)
    return str(path)


async def test_oneoff_example_reads_only_the_input_file_and_exits_as_asked(tmp_path: Path) -> None:
    script = REPO / "examples" / "workers" / "oneoff.py"
    code, out, err = await run_script(script, {"GPUD_TASK_INPUT_FILE": input_file(tmp_path, {"prompt": "a b c"})})
    assert (code, out) == (0, "a\nb\nc\n")
    assert "oneoff:" in err
    env = {
        "GPUD_TASK_INPUT_FILE": input_file(tmp_path, {"max_tokens": 2, "exit_code": 7}, "second.json"),
        "GPUD_TASK_INPUT": '{"exit_code": 0}',  # gpud no longer sets it; a stray one is ignored
    }
    code, out, _ = await run_script(script, env)
    assert (code, out) == (7, "token-0\ntoken-1\n")
    code, out, _ = await run_script(script, {"GPUD_TASK_INPUT": json.dumps({"prompt": "from env"})})
    assert (code, out) == (0, "token-0\ntoken-1\ntoken-2\ntoken-3\ntoken-4\n")  # the environment is not read


async def test_sdk_oneoff_mode_without_socket(tmp_path: Path, sdk_dir: Path, model_dir: Path) -> None:
    env = {
        "PYTHONPATH": str(sdk_dir),
        "MODEL_PATH": str(model_dir),
        "GPUD_TASK_INPUT_FILE": input_file(tmp_path, {"max_tokens": 3, "delay": 0}),
    }
    code, out, err = await run_script(STREAM_TEXT, env)
    assert (code, out) == (0, "alpha beta gamma\n")
    assert "max_tokens=3" in err and '"load_count": 1' in err
    failing = input_file(tmp_path, {"fail": True, "delay": 0}, "fail.json")
    code, out, err = await run_script(STREAM_TEXT, {**env, "GPUD_TASK_INPUT_FILE": failing})
    assert code == 1 and "metadata.fail" in err


async def test_back_to_back_tasks_are_never_refused_as_busy(worker: Worker) -> None:
    # gpud sends the next task the moment it reads `done`; the worker's previous task thread may still be
    # returning then. Many tiny tasks in a row make that instant likely; none may fail as "busy".
    await worker.channel.wait_ready(30)
    for i in range(300):
        events = await collect(worker.channel, f"t{i}", {"max_tokens": 1, "delay": 0})
        assert events[-1].data["status"] == "completed", [(e.type, e.data) for e in events]
