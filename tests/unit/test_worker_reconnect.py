"""Session adoption, worker side (issue 11): a REAL SDK worker whose gpud goes away without `shutdown` keeps its
model and reconnects to a socket re-created at the same path (an "adopt" start), saying hello `resuming` and ready
with its original info; with no reconnect time it exits as before. Adopting follows nothing the worker's uid put in
its directory, and a SessionWorker that re-attaches to a worker that never comes back says `worker_lost` in time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gpud import settings as config
from gpud.errors import ConfigError
from gpud.gpu.inventory import Gpu
from gpud.gpu.scheduler import Lease
from gpud.runtime.process import ProcessRuntime
from gpud.runtime.spec import build_spec
from gpud.settings.presets import Preset
from gpud.work.sessions.worker import SessionWorker, WorkerCrashed
from gpud.work.uids import WorkerUser
from gpud.worker import sdk_source_path, session_worker_env
from gpud.worker.channel import WorkerChannel
from gpud.worker.messages import WorkerGone
from gpud.worker.protocol import ENV_RECONNECT_SECONDS, ENV_SOCKET, SOCKET_NAME
from gpud.worker.socketdir import SocketDirUnusable
from tests.unit.test_worker_channel_sdk import STREAM_TEXT, WORDS, WORKER_UID, RawWorker, collect, own_channel
from tests.waiting import wait_until

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="handing the socket to another uid needs root")


@pytest.fixture
def base() -> Iterator[Path]:
    """A short, world-traversable directory (AF_UNIX paths are short; pytest's tmp dirs are root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="gpud-adopt-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sdk_dir(base: Path) -> Path:
    lib = base / "lib"
    lib.mkdir()
    shutil.copy(sdk_source_path(), lib / "gpud_worker.py")
    return lib


@pytest.fixture
def model_dir(base: Path) -> Path:
    model = base / "model"
    model.mkdir()
    (model / "tokens.txt").write_text(" ".join(WORDS) + "\n")
    return model


class Session:
    """The socket directory of one session and the real SDK worker (examples/workers/stream_text.py) using it."""

    def __init__(self, socket_dir: Path, proc: asyncio.subprocess.Process) -> None:
        self.socket_dir = socket_dir
        self.proc = proc


StartSession = Callable[[str], Awaitable[tuple[Session, WorkerChannel]]]


@pytest.fixture
async def session_factory(base: Path, sdk_dir: Path, model_dir: Path) -> AsyncIterator[StartSession]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(reconnect: str) -> tuple[Session, WorkerChannel]:
        channel = own_channel(base / "sess")
        await channel.start()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(sdk_dir),  # only the SDK copy, and -S: what a container sees
            ENV_SOCKET: str(channel.socket_path),
            ENV_RECONNECT_SECONDS: reconnect,
            "MODEL_PATH": str(model_dir),
        }
        proc = await asyncio.create_subprocess_exec(sys.executable, "-S", str(STREAM_TEXT), env=env)
        procs.append(proc)
        return Session(channel.socket_dir, proc), channel

    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def gpud_dies(channel: WorkerChannel) -> None:
    """What the worker sees when gpud is killed: its connection ends with no `shutdown`, and a dead socket file
    stays at the path (nobody listens on it any more)."""
    await channel.close()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(channel.socket_path))
    stale.close()


async def test_worker_resumes_on_an_adopting_channel_with_its_model_still_loaded(session_factory: StartSession) -> None:
    session, channel = await session_factory("30")
    first = await channel.wait_ready(30)
    assert first.info["load_count"] == 1 and not first.resumed
    inode = session.socket_dir.stat().st_ino
    for restart in range(2):  # gpud killed twice in a row: each time the worker comes back
        # Killed mid-task: the task's caller learns at once, and the worker must stop that task (else the
        # next one below would be refused as busy: its model thread would still run 50 s of tokens).
        events = channel.run_task(f"long{restart}", {"max_tokens": 1000, "delay": 0.05})
        assert (await anext(events)).type == "log"
        assert (await anext(events)).type == "text_delta"
        await gpud_dies(channel)
        with pytest.raises(WorkerGone):
            async for _ in events:
                pass

        channel = own_channel(session.socket_dir)
        await channel.start(adopt=True)
        assert session.socket_dir.stat().st_ino == inode, "the container's bind mount needs the same directory"
        again = await channel.wait_ready(30)
        assert again.resumed
        assert again.info == first.info, "the original ready info, load_seconds included: no second setup()"
        assert again.pid == first.pid == session.proc.pid
        done = await collect(channel, f"after{restart}", {"max_tokens": 3, "delay": 0})
        assert done[-1].data["status"] == "completed", [(e.type, e.data) for e in done]
        assert next(e for e in done if e.type == "result").data["load_count"] == 1
        assert channel.protocol_errors == 0
    await channel.shutdown()
    assert await asyncio.wait_for(session.proc.wait(), 10) == 0
    await channel.close()


async def test_with_no_reconnect_time_the_worker_exits_as_before(session_factory: StartSession) -> None:
    session, channel = await session_factory("0")
    await channel.wait_ready(30)
    await gpud_dies(channel)
    assert await asyncio.wait_for(session.proc.wait(), 10) == 0


async def test_a_worker_exits_0_when_gpud_does_not_come_back_in_time(session_factory: StartSession) -> None:
    session, channel = await session_factory("1")
    await channel.wait_ready(30)
    gone_at = time.monotonic()
    await gpud_dies(channel)
    assert await asyncio.wait_for(session.proc.wait(), 10) == 0
    assert 1.0 <= time.monotonic() - gone_at < 5.0


async def test_an_adopted_channel_still_takes_a_worker_that_did_not_resume(base: Path) -> None:
    # A worker that loaded again (e.g. it restarted its own process in the container) is taken, not resumed.
    (base / "sess").mkdir(mode=0o700)
    channel = own_channel(base / "sess")
    await channel.start(adopt=True)
    raw = RawWorker(channel.socket_path)
    try:
        await raw.send(b'{"type":"hello","protocol":1,"pid":7,"resuming":true}\n{"type":"ready","info":{"a":1}}\n')
        ready = await channel.wait_ready(5)
        assert (ready.resumed, ready.pid, ready.info) == (False, 7, {"a": 1})
    finally:
        raw.sock.close()
        await channel.close()


def plant(kind: str, sock_path: Path, base: Path) -> None:
    """What a hostile worker (owning its socket directory) may leave at worker.sock for the next gpud."""
    if kind == "symlink":
        os.symlink(base / "victim", sock_path)
    elif kind == "hardlink":
        os.link(base / "victim.sock", sock_path)  # a world-writable socket of root's, on the same filesystem
    elif kind == "directory":
        sock_path.mkdir()
        os.symlink(base / "victim", sock_path / "inside")
        (sock_path / "file").write_text("x")
    else:
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(sock_path))
        stale.close()


def fingerprint(path: Path) -> tuple[int, int, int, int]:
    info = path.lstat()
    return info.st_ino, info.st_mode, info.st_uid, info.st_gid


@as_root
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "directory", "stale"])
async def test_adopting_follows_nothing_the_worker_left_in_its_directory(base: Path, kind: str) -> None:
    victim = base / "victim"
    victim.write_text("root's file\n")
    victim.chmod(0o644)
    victim_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    victim_sock.bind(str(base / "victim.sock"))
    (base / "victim.sock").chmod(0o666)
    before = {p: fingerprint(p) for p in (victim, base / "victim.sock")}

    first = WorkerChannel(base / "sess", uid=WORKER_UID, gid=WORKER_UID)
    await first.start()
    await first.close()  # gpud gone; the directory, the worker's, stays (its container has it mounted)
    socket_dir = base / "sess"
    inode = socket_dir.stat().st_ino
    plant(kind, socket_dir / SOCKET_NAME, base)

    channel = WorkerChannel(socket_dir, uid=WORKER_UID, gid=WORKER_UID)
    await channel.start(adopt=True)
    try:
        assert {p: fingerprint(p) for p in before} == before, "a host file was touched through the worker's link"
        assert victim.read_text() == "root's file\n"
        info = channel.socket_path.lstat()
        assert stat.S_ISSOCK(info.st_mode) and (info.st_mode & 0o777, info.st_uid, info.st_gid) == (
            0o600,
            WORKER_UID,
            WORKER_UID,
        )
        dir_info = socket_dir.lstat()
        assert (dir_info.st_ino, dir_info.st_mode & 0o777, dir_info.st_uid) == (inode, 0o700, WORKER_UID)
        assert sorted(p.name for p in base.iterdir()) == ["sess", "victim", "victim.sock"], "staging left behind"
        worker = await asyncio.to_thread(RawWorker.as_uid, WORKER_UID, channel.socket_path)
        await worker.send(
            b'{"type":"hello","protocol":1,"pid":1,"resuming":true}\n'
            b'{"type":"ready","info":{"load_count":1},"resumed":true}\n'
        )
        ready = await channel.wait_ready(5)
        assert ready.resumed and ready.info == {"load_count": 1}
        worker.sock.close()
    finally:
        victim_sock.close()
        await channel.close()


async def test_adopting_needs_the_workers_own_directory(base: Path) -> None:
    with pytest.raises(SocketDirUnusable, match="gone"):
        await own_channel(base / "missing").start(adopt=True)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    (base / "link").symlink_to(elsewhere)
    with pytest.raises(SocketDirUnusable, match="not a directory"):
        await own_channel(base / "link").start(adopt=True)
    assert list(elsewhere.iterdir()) == [], "nothing was bound through the link"
    if os.geteuid() == 0:
        (base / "other").mkdir(mode=0o700)
        with pytest.raises(SocketDirUnusable, match=f"not the worker's uid {WORKER_UID}"):
            await WorkerChannel(base / "other", uid=WORKER_UID, gid=WORKER_UID).start(adopt=True)


def test_the_reconnect_time_is_a_setting_given_to_session_containers() -> None:
    assert config.load(None, environ={}).worker_reconnect_seconds == 60.0
    assert config.load(None, environ={"GPUD_WORKER_RECONNECT_SECONDS": "0"}).worker_reconnect_seconds == 0.0
    with pytest.raises(ConfigError, match="GPUD_WORKER_RECONNECT_SECONDS"):
        config.load(None, environ={"GPUD_WORKER_RECONNECT_SECONDS": "-1"})
    assert session_worker_env()[ENV_RECONNECT_SECONDS] == "60"
    assert session_worker_env(None, 2.5)[ENV_RECONNECT_SECONDS] == "2.5"


def session_worker(runtime: ProcessRuntime, socket_dir: Path, base: Path, user: WorkerUser) -> SessionWorker:
    preset = Preset(model_id="m", name="p", image="unused", command=("python3",))
    gpu = Gpu(index=0, uuid="GPU-static-0", name="static", difficulty="low", real=False)
    lease = Lease(gpu=gpu, holder="s-adopt", kind="session", acquired_at=time.time())
    return SessionWorker(runtime, preset, "s-adopt", "t0", lease, base, socket_dir, base, user)


async def run_container(runtime: ProcessRuntime, base: Path, user: WorkerUser, code: str) -> str:
    preset = Preset(model_id="m", name="p", image="unused", command=(sys.executable, "-S", "-c", code))
    return await runtime.run(build_spec(preset, user=user.spec, task_id="t0", session_id="s-adopt"))


@pytest.mark.parametrize("code", ["import time; time.sleep(60)", "import sys; sys.exit(5)"], ids=["silent", "exits"])
async def test_reattach_says_worker_lost_within_its_timeout_when_the_worker_does_not_come_back(
    base: Path, code: str
) -> None:
    user = WorkerUser(os.geteuid(), os.getegid())
    runtime = ProcessRuntime(None, allow_unisolated=True)
    socket_dir = base / "sess"
    first = WorkerChannel(socket_dir, uid=user.uid, gid=user.gid)
    await first.start()
    await first.close()
    container_id = await run_container(runtime, base, user, code)
    worker = session_worker(runtime, socket_dir, base, user)
    try:
        started = time.monotonic()
        with pytest.raises(WorkerCrashed) as caught:
            await worker.reattach(container_id, 2.0)
        assert caught.value.code == "worker_lost"
        assert time.monotonic() - started < 3.0
        if code.endswith("exit(5)"):
            assert caught.value.status is not None and caught.value.status.exit_code == 5
    finally:
        assert await worker.stop()
        await runtime.close()
    assert not socket_dir.exists()


@as_root
async def test_a_worker_racing_links_into_its_directory_never_gets_a_host_file_changed(base: Path) -> None:
    # The worker's uid owns the directory, so it may swap worker.sock for a link to a host file at any instant,
    # e.g. between gpud's bind() and chmod(): adopting must never operate on that path but by one rename().
    victim = base / "victim"
    victim.write_text("root's file\n")
    victim.chmod(0o644)
    before = fingerprint(victim)
    first = WorkerChannel(base / "sess", uid=WORKER_UID, gid=WORKER_UID)
    await first.start()
    await first.close()
    path = first.socket_path
    race = (
        "import os, time\n"
        f"os.setgroups([]); os.setgid({WORKER_UID}); os.setuid({WORKER_UID})\n"
        "end, swaps = time.monotonic() + 30, 0\n"
        f"while time.monotonic() < end and not os.path.exists({str(base / 'stop')!r}):\n"
        "    try:\n"
        f"        os.unlink({str(path)!r})\n"
        "    except OSError:\n"
        "        pass\n"
        "    try:\n"
        f"        os.symlink({str(victim)!r}, {str(path)!r}); swaps += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(swaps)\n"
    )
    attacker = await asyncio.create_subprocess_exec(sys.executable, "-S", "-c", race, stdout=asyncio.subprocess.PIPE)
    failures = 0
    try:
        await wait_until(lambda: path.is_symlink(), "the attacker to start")
        for _ in range(1000):
            channel = WorkerChannel(base / "sess", uid=WORKER_UID, gid=WORKER_UID)
            try:
                await channel.start(adopt=True)
            except OSError:
                failures += 1
            await channel.close()
    finally:
        (base / "stop").touch()
        out, _ = await attacker.communicate()
    assert int(out) > 1000, "the attacker did not race"
    assert fingerprint(victim) == before and victim.read_text() == "root's file\n"
    assert failures == 0, "the rename replaces whatever the worker put there"
