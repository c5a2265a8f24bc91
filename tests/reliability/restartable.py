"""A real `gpud run` on the test Podman engine that a test can kill -9 and start again on the same state, with the
engine's own view of its containers (by label) to check what runs against what gpud says."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gpud.runtime import make_runtime
from gpud.runtime.base import ContainerInfo, ContainerRuntime, ContainerState
from tests.daemonproc import DaemonProcess
from tests.integration.stack import SSEEvent, parse_sse
from tests.security.isolation_kit import API_KEY, IMAGES, Stream, add_model, open_base
from tests.waiting import wait_until

EXAMPLES = "/opt/gpud/examples"  # baked into the worker image
LIMITS = "{memory: 256m, cpus: 1, pids: 64}"


def presets(model_id: str) -> str:
    """The example session worker and the example one-off, run from the image."""
    image = "gpud-worker-python:latest"
    return (
        f"models:\n  {model_id}:\n"
        f"    stream: {{docker_image: '{image}', command: [python3, {EXAMPLES}/stream_text.py], mode: session,"
        f" readiness_timeout_seconds: 60, limits: {LIMITS}}}\n"
        f"    oneoff: {{docker_image: '{image}', command: [python3, {EXAMPLES}/oneoff.py], mode: oneoff,"
        f" limits: {LIMITS}}}\n"
    )


@dataclass
class Restartable:
    """One gpud (its state, port and admin socket stay the same across restarts) and the engine it uses."""

    daemon: DaemonProcess
    base: Path
    model_id: str
    engine: ContainerRuntime
    runs: int = 0
    logs: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The public API."""
        return f"http://127.0.0.1:{self.daemon.port}"

    @property
    def state(self) -> Path:
        """GPUD_STATE_DIR."""
        return self.base / "state"

    @property
    def db(self) -> Path:
        """The records database."""
        return self.state / "gpud.db"

    def start(self, **env: str) -> float:
        """Start gpud (again), with `env` changed from before; the seconds until it said READY=1."""
        self.daemon.env.update(env)
        self.runs += 1
        self.daemon.stderr_path = self.daemon.tmp / f"gpud-{self.daemon.port}-run{self.runs}.log"
        self.daemon.messages.clear()
        with contextlib.suppress(TimeoutError, BlockingIOError):  # datagrams the killed gpud left unread
            while self.daemon.notify.recv(4096):
                pass
        started = time.monotonic()
        self.daemon.start()
        return time.monotonic() - started

    def kill9(self) -> None:
        """SIGKILL: no shutdown, no cleanup, as a crash or a watchdog abort."""
        assert self.daemon.proc is not None
        self.logs.append(self.daemon.log)
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait(20)

    @property
    def log(self) -> str:
        """This run's log so far."""
        return self.daemon.log

    def admin(self, method: str, path: str) -> Any:
        """A call on the admin socket; its JSON (asserting success)."""
        status, body = self.daemon.request(method, path, admin=True)
        assert status < 300, (method, path, status, body)
        return body

    def sessions(self) -> dict[str, dict[str, Any]]:
        """Live sessions by id (the operator's view)."""
        return {s["session_id"]: s for s in self.admin("GET", "/api/sessions")["sessions"] if s["ended_at"] is None}

    def leases(self) -> dict[int, str]:
        """GPU id -> the id of its holder, for every leased GPU."""
        return {g["id"]: g["leased_to"]["id"] for g in self.admin("GET", "/api/gpus")["gpus"] if g["leased"]}

    async def containers(self, running_only: bool = False) -> list[ContainerInfo]:
        """This test's containers, as the engine lists them."""
        found = await self.engine.list({"gpud.model": self.model_id})
        return [c for c in found if not running_only or c.state is ContainerState.RUNNING]

    def body(self, task_type: str = "session", preset: str = "stream", **metadata: Any) -> dict[str, Any]:
        """A submission for this gpud's model (session_id in metadata goes to the body)."""
        body: dict[str, Any] = {"task_type": task_type, "model_id": self.model_id, "task_preset": preset}
        if "session_id" in metadata:
            body["session_id"] = metadata.pop("session_id")
        body["metadata"] = metadata
        return body

    async def submit(self, client: aiohttp.ClientSession, body: dict[str, Any]) -> Stream:
        """POST a task; its stream is read in the background."""
        response = await client.post(f"{self.url}/api/tasks/submit", json=body, headers={"X-API-Key": API_KEY})
        assert response.status == 200, await response.text()
        return Stream(response)

    async def get(self, client: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        """GET on the public API; status and JSON."""
        async with client.get(f"{self.url}{path}", headers={"X-API-Key": API_KEY}) as response:
            return response.status, await response.json()

    async def events(self, client: aiohttp.ClientSession, task_id: str, last_event_id: int) -> list[SSEEvent]:
        """A client coming back: GET /events with its Last-Event-ID, read to the end."""
        headers = {"X-API-Key": API_KEY, "Last-Event-ID": str(last_event_id)}
        async with client.get(f"{self.url}/api/tasks/{task_id}/events", headers=headers) as response:
            assert response.status == 200, await response.text()
            return parse_sse(await response.text())

    async def recorded(self, task_ids: Iterable[str], timeout: float = 10.0) -> None:
        """Wait until the records database holds a row for each task (they are written just after each change):
        a kill after this cannot lose them."""
        wanted = set(task_ids)

        def rows() -> bool:
            with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)) as conn:
                found = {r[0] for r in conn.execute("SELECT id FROM tasks")}
            return wanted <= found

        await wait_until(rows, f"rows for {len(wanted)} tasks in {self.db}", timeout)


async def open_restartable(tmp: Path, socket: str, gpus: int, **env: str) -> Restartable:
    """A gpud on Podman with `gpus` static GPUs (all `low`) and the example workers; not started."""
    base = open_base()
    model_id = add_model(base)
    (base / "models.yaml").write_text(presets(model_id))
    daemon = DaemonProcess(
        tmp,
        env={
            "GPUD_RUNTIME": "podman",
            "GPUD_RUNTIME_SOCKET": socket,
            "ALLOWED_DOCKER_IMAGES": IMAGES,
            "AUTO_FETCH_MODELS": "false",
            "MODEL_CACHE_DIR": str(base / "models"),
            "GPUD_STATE_DIR": str(base / "state"),
            "GPUD_PRESETS_FILE": str(base / "models.yaml"),
            "GPU_DEVICE_IDS": ",".join(str(i) for i in range(gpus)),
            "GPU_DEVICE_DIFFICULTY": "",
            **env,
        },
    )
    return Restartable(daemon, base, model_id, make_runtime("podman", socket))


async def close_restartable(host: Restartable) -> list[str]:
    """Stop gpud cleanly (SIGTERM ends every session) and remove whatever of this test is left; returns the
    containers that were left (a test asserts there are none)."""
    host.daemon.kill()
    left = [c.id for c in await host.containers()]
    for container_id in left:
        with contextlib.suppress(Exception):
            await host.engine.remove(container_id)
    await host.engine.close()
    shutil.rmtree(host.base, ignore_errors=True)
    return left


async def open_sessions(host: Restartable, client: aiohttp.ClientSession, count: int) -> list[str]:
    """Open `count` sessions at once (a first short task each); their ids, in the order opened."""
    streams = [await host.submit(client, host.body(max_tokens=2, delay=0)) for _ in range(count)]
    ids = []
    for stream in streams:
        finish = await stream.end()
        assert finish["status"] == "completed", finish
        ids.append(str(next(e.data["session_id"] for e in stream.events if e.data.get("session_id"))))
    return ids


def fresh_client() -> aiohttp.ClientSession:
    """An HTTP client that keeps no connection for reuse: one kept from before a kill would fail the next request."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


def seconds_in_log(log: str, pattern: str) -> list[float]:
    """Every number of seconds a log pattern (with one `([0-9.]+)` group) captured."""
    return [float(m) for m in re.findall(pattern, log)]


def new_id() -> str:
    """A short unique marker."""
    return uuid.uuid4().hex[:8]


async def settle(streams: Iterable[Stream]) -> None:
    """Let every background reader end (their connections died with gpud)."""
    readers = [s.reader for s in streams if s.reader is not None]
    await asyncio.gather(*readers, return_exceptions=True)
    for stream in streams:
        stream.response.close()
