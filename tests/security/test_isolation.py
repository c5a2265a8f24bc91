"""HIGH-1 of the security review (issue 10): a local user took over other clients' session workers and read task
inputs, without an API key, and the process runtime ran workers as root when it could not `unshare`.

The attacks run against a real `gpud run` on real Podman (isolation is the point there): the attacker is a process
of uid 65534 (nobody) on the host, started with `setpriv` (tests/security/attacker.py). It reads `/health` for
holder ids, lists and enters the state directories, connects to a live session's worker socket before its worker
does (a preset that sleeps before it connects) and after, plays the worker to steal the task input and answer with
its own output, and reads a one-off's `input.json` and `/proc/<pid>/environ`. Each must be refused, and the victim's
task must complete with its own output. A worker of another session (another uid) is refused too, on the host
(process runtime, where workers are host processes) as well as for Podman workers' uids.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gpud import settings as config
from gpud.api.errors import from_domain
from gpud.errors import ConfigError
from gpud.runtime import make_runtime
from gpud.runtime.base import ContainerFailed
from gpud.runtime.process import ProcessRuntime
from gpud.runtime.spec import build_spec
from gpud.settings.presets import Preset
from gpud.work.uids import WorkerIds, WorkerIdsExhausted
from tests.daemonproc import DaemonProcess
from tests.figures import Figures
from tests.integration.conftest import engine_socket
from tests.integration.stack import parse_sse
from tests.security.attacker import NOBODY, attempts, hijack
from tests.security.isolation_kit import (
    DEFAULT_RANGE,
    IMAGES,
    Gpud,
    add_model,
    copy_workers,
    mode_and_owner,
    open_base,
    worker_pids,
)
from tests.waiting import wait_until

EXAMPLES = "/opt/gpud/examples"  # baked into the worker image
SLOW_START = 6  # seconds the `slow` preset waits before its worker connects: the attacker's window


def podman_presets(model_id: str) -> str:
    """A session worker, one that connects only after SLOW_START seconds, and a one-off command."""
    limits = "{memory: 256m, cpus: 1, pids: 64}"
    slow = f"sleep {SLOW_START}; exec python3 {EXAMPLES}/stream_text.py"
    return (
        f"models:\n  {model_id}:\n"
        f"    stream: {{docker_image: 'gpud-worker-python:latest', command: [python3, {EXAMPLES}/stream_text.py],"
        f" mode: session, readiness_timeout_seconds: 60, limits: {limits}}}\n"
        f"    slow: {{docker_image: 'gpud-worker-python:latest', command: [sh, -c, '{slow}'], mode: session,"
        f" readiness_timeout_seconds: 60, limits: {limits}}}\n"
        f"    oneoff: {{docker_image: 'gpud-worker-python:latest', command: [python3, {EXAMPLES}/oneoff.py],"
        f" mode: oneoff, limits: {limits}}}\n"
    )


@pytest.fixture(scope="module")
def podman_gpud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpud]:
    """One real `gpud run` on the test Podman engine for the attacks below (each uses its own sessions)."""
    socket = engine_socket("podman")
    base = open_base()
    model_id = add_model(base)
    (base / "models.yaml").write_text(podman_presets(model_id))
    env = {
        "GPUD_RUNTIME": "podman",
        "GPUD_RUNTIME_SOCKET": socket,
        "ALLOWED_DOCKER_IMAGES": IMAGES,
        "AUTO_FETCH_MODELS": "false",
        "MODEL_CACHE_DIR": str(base / "models"),
        "GPUD_STATE_DIR": str(base / "state"),
        "GPUD_PRESETS_FILE": str(base / "models.yaml"),
    }
    daemon = DaemonProcess(tmp_path_factory.mktemp("podman-gpud"), env=env)
    try:
        yield Gpud(daemon.start(), base, model_id)
    finally:
        daemon.kill()
        left = asyncio.run(_containers_of(socket, model_id))
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"containers left behind: {left}"


async def _containers_of(socket: str, model_id: str) -> list[str]:
    runtime = make_runtime("podman", socket)
    try:
        found = await runtime.list({"gpud.model": model_id})
        for info in found:
            await runtime.remove(info.id)
        return [info.id for info in found]
    finally:
        await runtime.close()


def in_range(uid: int) -> bool:
    return DEFAULT_RANGE[0] <= uid <= DEFAULT_RANGE[1]


async def test_nobody_cannot_reach_a_session_socket_before_or_after_its_worker(
    podman_gpud: Gpud, figures: Figures
) -> None:
    g = podman_gpud
    secret = f"victim-secret-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as client:
        victim = await g.submit(client, g.body("session", "slow", prompt=secret, max_tokens=3, delay=0))
        session_id = (await victim.wait("created")).data["session_id"]
        sock_dir = g.session_dir(session_id)
        sock = sock_dir / "worker.sock"
        # The layout: root's traversable-only dirs, then the worker's own 0700 dir and 0600 socket.
        assert mode_and_owner(g.state)[:2] == mode_and_owner(g.state / "sessions")[:2] == (0o711, 0)
        uid = mode_and_owner(sock_dir)[1]
        assert in_range(uid) and mode_and_owner(sock_dir) == (0o700, uid, uid)
        assert mode_and_owner(sock) == (0o600, uid, uid)
        tries = {
            "list state dir": ("list", str(g.state)),
            "list sessions/": ("list", str(g.state / "sessions")),
            "list tasks/": ("list", str(g.state / "tasks")),
            "list session dir": ("list", str(sock_dir)),
            "enter session dir": ("enter", str(sock_dir)),
            "connect to worker socket": ("connect", str(sock)),
        }
        before = await attempts(NOBODY, tries)
        stolen = await hijack(NOBODY, str(sock), seconds=2.0)
        assert victim.find(lambda e: e.data.get("status") == "session_ready") is None, "the window had closed"
        assert before == dict.fromkeys(tries, "EACCES")
        assert stolen and set(stolen) == {"EACCES"}, stolen
        finish = await victim.end()
        assert finish["status"] == "completed", finish
        assert victim.text == "alpha beta gamma" and "PWNED" not in victim.text
        # The session is live and idle now, its worker connected: still out of reach.
        after = await attempts(NOBODY, tries)
        stolen_after = await hijack(NOBODY, str(sock), seconds=1.0)
        assert after == dict.fromkeys(tries, "EACCES") and set(stolen_after) == {"EACCES"}
        status, _ = await g.get(client, f"/api/sessions/{session_id}")
        assert status == 200
        await client.delete(f"{g.url}/api/sessions/{session_id}", headers={"X-API-Key": "test-key"})
    attack = "HIGH-1 session socket (nobody)"
    figures.record(attack, "probes refused before the worker connected", len(before) + len(stolen), "EACCES")
    figures.record(attack, "probes refused after the worker connected", len(after) + len(stolen_after), "EACCES")
    figures.record(attack, "task inputs stolen", sum(s.startswith("hijacked") for s in stolen + stolen_after))


async def test_the_peer_check_refuses_nobody_even_when_the_modes_are_opened_up(
    podman_gpud: Gpud, figures: Figures
) -> None:
    g = podman_gpud
    secret = f"victim-secret-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as client:
        victim = await g.submit(client, g.body("session", "slow", prompt=secret, max_tokens=3, delay=0))
        session_id = (await victim.wait("created")).data["session_id"]
        sock_dir = g.session_dir(session_id)
        # A mistaken operator (or a bug) opens the directory and socket to everyone before the worker connects.
        sock_dir.chmod(0o777)
        (sock_dir / "worker.sock").chmod(0o666)
        stolen = await hijack(NOBODY, str(sock_dir / "worker.sock"), seconds=2.0)
        assert victim.find(lambda e: e.data.get("status") == "session_ready") is None, "the window had closed"
        assert stolen and set(stolen) == {"closed"}, stolen  # connected, and hung up on at once by SO_PEERCRED
        finish = await victim.end()
        assert finish["status"] == "completed", finish
        assert victim.text == "alpha beta gamma" and "PWNED" not in victim.text
        await client.delete(f"{g.url}/api/sessions/{session_id}", headers={"X-API-Key": "test-key"})
    refusals = g.daemon.log.count(f"uid {NOBODY} (the worker runs as uid")
    assert refusals >= len(stolen)
    attack = "HIGH-1 opened socket (nobody)"
    figures.record(attack, "connections refused by SO_PEERCRED", len(stolen))
    figures.record(attack, "refusals logged by gpud (warning)", refusals)


async def test_nobody_cannot_read_a_oneoff_input_or_environment(podman_gpud: Gpud, figures: Figures) -> None:
    g = podman_gpud
    secret = f"secret-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as client:
        victim = await g.submit(client, g.body("oneoff", "oneoff", prompt=f"{secret} two three", sleep=4))
        await victim.wait("working")
        await wait_until(lambda: victim.text, "the command's first line (it has read its input)", 60)
        task_dir = g.state / "tasks" / victim.task_id
        uid = mode_and_owner(task_dir)[1]
        assert in_range(uid) and mode_and_owner(task_dir) == (0o700, uid, uid)
        assert mode_and_owner(task_dir / "input.json") == (0o400, uid, uid)
        (pid,) = worker_pids(uid, "oneoff.py")
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        assert f"GPUD_TASK_ID={victim.task_id}" in environ  # this is the victim's worker ...
        assert secret not in environ and "GPUD_TASK_INPUT=" not in environ  # ... and its input is not in there
        tries = {
            "list tasks/": ("list", str(g.state / "tasks")),
            "enter the task's dir": ("enter", str(task_dir)),
            "read input.json": ("read", str(task_dir / "input.json")),
            "read /proc/<pid>/environ": ("read", f"/proc/{pid}/environ"),
        }
        seen = await attempts(NOBODY, tries)
        assert seen == dict.fromkeys(tries, "EACCES")
        finish = await victim.end()
    assert finish["status"] == "completed", finish
    assert victim.text == f"{secret}\ntwo\nthree\n"
    assert not task_dir.exists()
    figures.record("HIGH-1 one-off input (nobody)", "reads refused", len(seen), "EACCES")


async def test_public_health_and_gpus_name_no_holder(podman_gpud: Gpud, figures: Figures) -> None:
    g = podman_gpud
    async with aiohttp.ClientSession() as client:
        first = await g.submit(client, g.body("session", "stream", "low", max_tokens=1, delay=0))
        session_id = (await first.wait("session_ready")).data["session_id"]
        await first.end()
        oneoff = await g.submit(client, g.body("oneoff", "oneoff", "high", sleep=3))
        await oneoff.wait("working")
        holders = [session_id, first.task_id, oneoff.task_id]
        exposed = 0
        for path, key in (("/health", False), ("/api/gpus", True)):
            status, text = await g.get(client, path, key=key)
            assert status == 200, text
            exposed += sum(holder in text for holder in holders)
            gpus = json.loads(text)["gpus"]
            assert [(gpu["leased"], gpu["leased_to"]["kind"]) for gpu in gpus] == [(True, "session"), (True, "task")]
            assert all("id" not in gpu["leased_to"] for gpu in gpus)
        assert exposed == 0
        # The operator, on the admin socket, still sees who holds what.
        admin = g.admin("GET", "/api/gpus")["gpus"]
        assert [gpu["leased_to"]["id"] for gpu in admin] == [session_id, oneoff.task_id]
        assert (await oneoff.end())["status"] == "completed"
        await client.delete(f"{g.url}/api/sessions/{session_id}", headers={"X-API-Key": "test-key"})
    figures.record("HIGH-1 /health (no key)", "holder ids in public GPU reports", exposed)


async def test_workers_of_two_sessions_cannot_reach_each_other(podman_gpud: Gpud, figures: Figures) -> None:
    g = podman_gpud
    async with aiohttp.ClientSession() as client:
        streams = [
            await g.submit(client, g.body("session", "stream", difficulty, max_tokens=1, delay=0))
            for difficulty in ("low", "high")
        ]
        ids = [(await s.wait("session_ready")).data["session_id"] for s in streams]
        for stream in streams:
            await stream.end()
        dirs = [g.session_dir(i) for i in ids]
        uids = [mode_and_owner(d)[1] for d in dirs]
        assert uids[0] != uids[1] and all(in_range(u) for u in uids)
        labels = await asyncio.gather(*(_uid_label(g, i) for i in ids))
        assert labels == [str(u) for u in uids]  # recorded on the container, for restart adoption
        refused = 0
        for me, other in ((0, 1), (1, 0)):
            tries = {
                "list": ("list", str(dirs[other])),
                "enter": ("enter", str(dirs[other])),
                "connect": ("connect", str(dirs[other] / "worker.sock")),
            }
            seen = await attempts(uids[me], tries)
            assert seen == dict.fromkeys(tries, "EACCES"), (me, seen)
            stolen = await hijack(uids[me], str(dirs[other] / "worker.sock"), seconds=0.5)
            assert set(stolen) == {"EACCES"}
            refused += len(seen) + len(stolen)
        for session_id in ids:
            await client.delete(f"{g.url}/api/sessions/{session_id}", headers={"X-API-Key": "test-key"})
    figures.record("HIGH-1 cross-session (podman uids)", "probes refused", refused, "EACCES")


async def _uid_label(g: Gpud, session_id: str) -> str:
    container_id = g.admin("GET", f"/api/sessions/{session_id}")["container_id"]
    runtime = make_runtime("podman", g.daemon.env["GPUD_RUNTIME_SOCKET"])
    try:
        return (await runtime.inspect(container_id)).labels["gpud.uid"]
    finally:
        await runtime.close()


# --- the allocator ----------------------------------------------------------------------------------------------


def test_worker_ids_are_distinct_reused_lowest_first_and_run_out_with_a_503(figures: Figures) -> None:
    ids = WorkerIds(100, 102, can_switch=True)
    users = [ids.for_preset(None, f"holder-{n}") for n in range(3)]
    assert [(u.uid, u.gid) for u in users] == [(100, 100), (101, 101), (102, 102)]
    assert ids.acquire("holder-1") == 101  # a holder asking again keeps its id
    with pytest.raises(WorkerIdsExhausted) as info:
        ids.for_preset(None, "one-too-many")
    response = from_domain(info.value)
    assert response.status == 503 and response.headers["Retry-After"]
    assert "GPUD_WORKER_UID_RANGE (100-102)" in info.value.message and info.value.code == "worker_ids_exhausted"
    ids.release(users[1])
    ids.release(users[1])  # twice is harmless
    assert ids.for_preset(None, "late").uid == 101  # the lowest free id comes back first
    ids.release(users[2])
    ids.release(users[0])
    assert [ids.acquire(h) for h in ("a", "b")] == [100, 102]
    # Presets that name a user are not allocated (root is the operator's explicit, unisolated choice).
    assert (ids.for_preset("root", "r").spec, ids.for_preset("1234", "n").spec) == ("0:0", "1234:1234")
    assert ids.in_use == 3
    # Without root gpud cannot hand out ids: every worker runs as gpud's own user.
    own = WorkerIds(100, 102, can_switch=False).for_preset(None, "x")
    assert (own.uid, own.gid, own.holder) == (os.geteuid(), os.getegid(), None)
    figures.record("HIGH-1 worker uid allocator", "uids handed out before a 503", 3)


@pytest.mark.parametrize("bad", ["0-10", "10-5", "a-b", "5", "1-4294967295", ""])
def test_the_uid_range_setting_is_checked_at_load(bad: str) -> None:
    with pytest.raises(ConfigError, match="worker_uid_range"):
        config.load(None, environ={"GPUD_WORKER_UID_RANGE": bad})
    assert config.load(None, environ={}).worker_uid_range == DEFAULT_RANGE
    assert config.load(None, environ={"GPUD_WORKER_UID_RANGE": " 7-9 "}).worker_uid_range == (7, 9)


# --- the process runtime: workers are host processes, so their uids are all that keeps them apart ---------------

SNOOP = '''"""A one-off worker that tries to reach another session's worker socket, named in its task input."""
import json, os, socket, time

with open(os.environ["GPUD_TASK_INPUT_FILE"], encoding="utf-8") as fh:
    meta = json.load(fh)
sock = meta["target"]

def attempt(call):
    try:
        call()
        return "allowed"
    except PermissionError:
        return "EACCES"
    except OSError as exc:
        return type(exc).__name__

result = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
result["list"] = attempt(lambda: os.listdir(os.path.dirname(sock)))
result["enter"] = attempt(lambda: os.chdir(os.path.dirname(sock)))
result["connect"] = attempt(lambda: socket.socket(socket.AF_UNIX).connect(sock))
print(json.dumps(result), flush=True)
time.sleep(float(meta.get("sleep", 0)))
'''


def process_presets(model_id: str, workers: Path) -> str:
    return (
        f"models:\n  {model_id}:\n"
        f"    stream: {{docker_image: 'gpud-worker-python:latest', command: [python3, {workers}/stream_text.py],"
        " mode: session, readiness_timeout_seconds: 30}\n"
        f"    snoop: {{docker_image: 'gpud-worker-python:latest', command: [python3, {workers}/snoop.py],"
        " mode: oneoff}\n"
    )


@pytest.fixture
def process_gpud(tmp_path: Path) -> Iterator[Gpud]:
    """A real `gpud run` on the process runtime with three GPUs and only two worker uids."""
    base = open_base()
    model_id = add_model(base)
    workers = copy_workers(base, {"snoop.py": SNOOP})
    (base / "models.yaml").write_text(process_presets(model_id, workers))
    env = {
        "GPU_DEVICE_IDS": "0,1,2",
        "GPU_DEVICE_DIFFICULTY": "0:low,1:high,2:high",
        "GPUD_WORKER_UID_RANGE": "2000000500-2000000501",
        "ALLOWED_DOCKER_IMAGES": IMAGES,
        "AUTO_FETCH_MODELS": "false",
        "MODEL_CACHE_DIR": str(base / "models"),
        "GPUD_STATE_DIR": str(base / "state"),
        "GPUD_PRESETS_FILE": str(base / "models.yaml"),
    }
    daemon = DaemonProcess(tmp_path, env=env)
    try:
        yield Gpud(daemon.start(), base, model_id)
    finally:
        daemon.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="per-worker uids need gpud to run as root")
async def test_a_process_worker_cannot_reach_another_session_and_uids_run_out_cleanly(
    process_gpud: Gpud, figures: Figures
) -> None:
    g = process_gpud
    async with aiohttp.ClientSession() as client:
        session = await g.submit(client, g.body("session", "stream", "low", max_tokens=2, delay=0))
        session_id = (await session.wait("session_ready")).data["session_id"]
        assert (await session.end())["status"] == "completed"
        sock = g.session_dir(session_id) / "worker.sock"
        assert mode_and_owner(sock.parent) == (0o700, 2000000500, 2000000500)
        (pid,) = worker_pids(2000000500, "stream_text.py")
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        ids = [status[key].split() for key in ("Uid", "Gid", "Groups")]
        assert ids == [["2000000500"] * 4, ["2000000500"] * 4, []]  # real, effective, saved, fs; no groups
        tmpdir = _environ(pid)["TMPDIR"]
        assert mode_and_owner(Path(tmpdir)) == (0o700, 2000000500, 2000000500)  # not the old 1777
        # A real worker of another uid, on the same host, goes for the session's socket.
        snoop = await g.submit(client, g.body("oneoff", "snoop", "high", target=str(sock), sleep=30))
        await wait_until(lambda: snoop.text, "the snooping worker's report", 30)
        report = json.loads(snoop.text)
        assert (report["uid"], report["gid"], report["groups"]) == (2000000501, 2000000501, [])
        probes = ("list", "enter", "connect")
        assert {k: report[k] for k in probes} == dict.fromkeys(probes, "EACCES")
        # Both uids are taken now: a third worker is a clear 503, and its GPU goes straight back.
        third = g.body("oneoff", "snoop", "high", target="x")
        response = await client.post(f"{g.url}/api/tasks/submit", json=third, headers={"X-API-Key": "test-key"})
        error = (await response.json())["error"]
        assert response.status == 503 and response.headers["Retry-After"] and error["code"] == "worker_ids_exhausted"
        assert [gpu["leased"] for gpu in g.admin("GET", "/api/gpus")["gpus"]] == [True, True, False]
        await client.delete(f"{g.url}/api/tasks/{snoop.task_id}", headers={"X-API-Key": "test-key"})
        assert (await snoop.end())["status"] == "cancelled"
        # Its uid came back and is handed out again.
        again = await g.submit(client, g.body("oneoff", "snoop", "high", target=str(sock)))
        assert (await again.end())["status"] == "completed"
        report = json.loads(again.text)
        assert report["uid"] == 2000000501 and {k: report[k] for k in probes} == dict.fromkeys(probes, "EACCES")
        await client.delete(f"{g.url}/api/sessions/{session_id}", headers={"X-API-Key": "test-key"})
    attack = "HIGH-1 cross-session (process runtime)"
    figures.record(attack, "probes by another worker refused", 3 * 2, "EACCES")
    figures.record(attack, "submissions refused with 503 (uids exhausted)", 1)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


# --- the process runtime without unshare ------------------------------------------------------------------------

WHOAMI = (
    "import json, os; print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(),"
    " 'net': os.readlink('/proc/self/ns/net')}))"
)
# Constructing the runtime with this probe result is how a host without a working `unshare` looks to it (the
# daemon test below gets the same from a PATH that really has no `unshare`).
NO_UNSHARE = (None, "simulated: `unshare` is not on PATH")


async def _run_whoami(runtime: ProcessRuntime) -> dict[str, object]:
    preset = Preset(model_id="m", name="whoami", image="unused", command=("python3", "-c", WHOAMI))
    spec = build_spec(preset, user="2000065533:2000065533", task_id=uuid.uuid4().hex[:12])
    container_id = await runtime.run(spec)
    try:
        assert (await runtime.wait(container_id)).exit_code == 0
        lines = [line.line async for line in runtime.logs(container_id, follow=False)]
        return dict(json.loads(lines[-1]))
    finally:
        await runtime.remove(container_id)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching workers to their uid needs root")
async def test_process_runtime_without_unshare_refuses_workers_unless_allowed(figures: Figures) -> None:
    host_net = os.readlink("/proc/self/ns/net")
    refusing = ProcessRuntime(unshare=NO_UNSHARE)
    health = await refusing.health()
    assert health.ok and "are refused" in health.degraded and "GPUD_PROCESS_ALLOW_UNISOLATED" in health.degraded
    with pytest.raises(ContainerFailed, match="GPUD_PROCESS_ALLOW_UNISOLATED"):
        await _run_whoami(refusing)
    assert await refusing.list({}) == []
    allowed = ProcessRuntime(allow_unisolated=True, unshare=NO_UNSHARE)
    assert "run unisolated" in (await allowed.health()).degraded
    seen = await _run_whoami(allowed)
    # Still its own uid with no groups (gpud is root), but on the host's network: hence degraded.
    assert seen == {"uid": 2000065533, "gid": 2000065533, "groups": [], "net": host_net}
    real = ProcessRuntime()  # this host's own probe
    if (await real.health()).degraded == "":
        isolated = await _run_whoami(real)
        assert isolated["uid"] == 2000065533 and isolated["net"] != host_net
    figures.record("process runtime without unshare", "workers started while not allowed", 0)


def _bin_without_unshare(base: Path) -> Path:
    """A PATH directory with what the workers need (python3, sh) and no `unshare` (nor prlimit)."""
    bin_dir = base / "bin"
    bin_dir.mkdir()
    # The workers run as their own uids: they need an interpreter every user can reach (a checkout's venv may
    # live under /root), as the system's python3 is.
    python3 = next(p for p in ("/usr/bin/python3", sys.executable) if os.path.exists(p))
    (bin_dir / "python3").symlink_to(python3)
    (bin_dir / "sh").symlink_to("/bin/sh")
    bin_dir.chmod(0o755)
    return bin_dir


@pytest.mark.skipif(os.geteuid() != 0, reason="switching workers to their uid needs root")
async def test_a_daemon_without_unshare_refuses_workers_and_says_degraded(tmp_path: Path, figures: Figures) -> None:
    base = open_base()
    try:
        model_id = add_model(base)
        command = f"[python3, -c, {json.dumps(WHOAMI)}]"
        (base / "models.yaml").write_text(
            f"models:\n  {model_id}:\n    whoami: {{docker_image: 'gpud-worker-python:latest', command: {command},"
            " mode: oneoff}\n"
        )
        env = {
            "PATH": str(_bin_without_unshare(base)),
            "ALLOWED_DOCKER_IMAGES": IMAGES,
            "AUTO_FETCH_MODELS": "false",
            "MODEL_CACHE_DIR": str(base / "models"),
            "GPUD_STATE_DIR": str(base / "state"),
            "GPUD_PRESETS_FILE": str(base / "models.yaml"),
        }
        body = {"task_type": "oneoff", "model_id": model_id, "task_preset": "whoami"}
        refusing = DaemonProcess(tmp_path, env=env).start()
        try:
            status, health = refusing.request("GET", "/health")
            assert status == 503 and health["status"] == "degraded"
            assert any("`unshare` is not on PATH" in r and "are refused" in r for r in health["reasons"]), health
            _, stream = refusing.request("POST", "/api/tasks/submit", body, headers={"X-API-Key": "test-key"})
            finish = parse_sse(stream)[-1].data
            assert finish["status"] == "failed" and finish["error"]["code"] == "container_failed"
            assert "GPUD_PROCESS_ALLOW_UNISOLATED" in finish["error"]["message"]
            assert not any(gpu["leased"] for gpu in refusing.request("GET", "/api/gpus", admin=True)[1]["gpus"])
        finally:
            refusing.kill()
        allowing = DaemonProcess(tmp_path, env={**env, "GPUD_PROCESS_ALLOW_UNISOLATED": "true"}).start()
        try:
            status, health = allowing.request("GET", "/health")
            assert status == 503 and any("run unisolated" in r for r in health["reasons"]), health
            _, stream = allowing.request("POST", "/api/tasks/submit", body, headers={"X-API-Key": "test-key"})
            events = parse_sse(stream)
            assert events[-1].data["status"] == "completed", events[-1].data
            seen = json.loads("".join(str(e.data.get("delta", "")) for e in events if e.event == "text_delta"))
            assert DEFAULT_RANGE[0] <= seen["uid"] <= DEFAULT_RANGE[1] and seen["groups"] == []
            assert seen["net"] == os.readlink("/proc/self/ns/net")  # the host's network: what "degraded" warns of
        finally:
            allowing.kill()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    figures.record("process runtime without unshare", "daemon /health status when unisolated", 503, "HTTP")
