"""What the isolation attacks share: a real `gpud run` with its files in a world-traversable place, submissions
whose SSE streams are read in the background, and where to find a worker on the host."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.daemonproc import REPO, DaemonProcess
from tests.integration.stack import SSEEvent, parse_sse
from tests.waiting import wait_until

API_KEY = "test-key"  # DaemonProcess's key
IMAGES = "gpud-worker-python:*,localhost/gpud-worker-python:*"
WORDS = "alpha beta gamma delta epsilon zeta eta theta"
DEFAULT_RANGE = (2_000_000_000, 2_000_065_535)


def open_base() -> Path:
    """A world-traversable directory under /var/tmp (pytest's tmp dirs are root's 0700) holding one model."""
    base = Path(tempfile.mkdtemp(prefix="gpud-iso-", dir="/var/tmp"))
    base.chmod(0o755)
    return base


def add_model(base: Path) -> str:
    """A model whose tokens.txt the example worker streams; readable by every worker uid."""
    model_id = f"m-{uuid.uuid4().hex[:10]}"
    model = base / "models" / model_id
    model.mkdir(parents=True)
    (model / "tokens.txt").write_text(WORDS + "\n")
    for path in (base / "models", model):
        path.chmod(0o755)
    (model / "tokens.txt").chmod(0o644)
    return model_id


def copy_workers(base: Path, extra: dict[str, str] | None = None) -> Path:
    """The example workers (and `extra` scripts) where process-runtime workers of any uid can read them."""
    workers = base / "workers"
    shutil.copytree(REPO / "examples" / "workers", workers, ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in (extra or {}).items():
        (workers / name).write_text(text)
    for path in (workers, *workers.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return workers


@dataclass
class Gpud:
    """One running daemon, where its files are, and its model."""

    daemon: DaemonProcess
    base: Path
    model_id: str

    @property
    def state(self) -> Path:
        """GPUD_STATE_DIR."""
        return self.base / "state"

    @property
    def url(self) -> str:
        """The public API."""
        return f"http://127.0.0.1:{self.daemon.port}"

    def session_dir(self, session_id: str) -> Path:
        """Where a session's worker socket lives (gpud names the directory by the id's first 16 characters)."""
        return self.state / "sessions" / session_id[:16]

    def body(self, task_type: str, preset: str, difficulty: str = "low", **metadata: Any) -> dict[str, Any]:
        """A submission for this daemon's model."""
        return {
            "task_type": task_type,
            "task_difficulty": difficulty,
            "model_id": self.model_id,
            "task_preset": preset,
            "metadata": metadata,
        }

    async def submit(self, client: aiohttp.ClientSession, body: dict[str, Any]) -> Stream:
        """POST a task; its stream is read in the background."""
        response = await client.post(f"{self.url}/api/tasks/submit", json=body, headers={"X-API-Key": API_KEY})
        assert response.status == 200, await response.text()
        return Stream(response)

    async def get(self, client: aiohttp.ClientSession, path: str, key: bool = True) -> tuple[int, str]:
        """GET on the public API, with or without the key; the raw body."""
        headers = {"X-API-Key": API_KEY} if key else {}
        async with client.get(f"{self.url}{path}", headers=headers) as response:
            return response.status, await response.text()

    def admin(self, method: str, path: str) -> Any:
        """A call on the admin socket (the operator's view); its JSON."""
        status, body = self.daemon.request(method, path, admin=True)
        assert status < 300, (status, body)
        return body


@dataclass
class Stream:
    """A submitted task's SSE stream, read in the background so the test can act while the task runs."""

    response: aiohttp.ClientResponse
    events: list[SSEEvent] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        buffer = b""
        async for chunk in self.response.content.iter_any():
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                self.events += parse_sse(frame.decode() + "\n\n")

    def find(self, wanted: Callable[[SSEEvent], bool]) -> SSEEvent | None:
        """The first event so far that matches."""
        return next((event for event in self.events if wanted(event)), None)

    async def wait(self, status: str, timeout: float = 90.0) -> SSEEvent:
        """The first event whose data has this status (e.g. `created`, `working`, `session_ready`)."""
        return await wait_until(lambda: self.find(lambda e: e.data.get("status") == status), status, timeout)

    async def end(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for the stream to end; the task_finish data."""
        assert self.reader is not None
        await asyncio.wait_for(self.reader, timeout)
        self.response.close()
        assert self.events and self.events[-1].event == "task_finish", [e.event for e in self.events]
        return self.events[-1].data

    @property
    def task_id(self) -> str:
        """The task's id (every stream starts with it)."""
        return str(self.events[0].data["task_id"])

    @property
    def text(self) -> str:
        """The text deltas so far, joined."""
        return "".join(str(e.data.get("delta", "")) for e in self.events if e.event == "text_delta")


def worker_pids(uid: int, needle: str) -> list[int]:
    """Host pids of processes running as `uid` whose command line contains `needle`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        if int(uids[0]) == uid and needle in cmdline:
            found.append(int(entry))
    return found


def mode_and_owner(path: Path) -> tuple[int, int, int]:
    """(permission bits, uid, gid) of a path, without following a link."""
    info = path.lstat()
    return info.st_mode & 0o7777, info.st_uid, info.st_gid
