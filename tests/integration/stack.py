"""A whole gpud in the test process: real services, a real runtime, the public app on a real TCP socket.

The model id is unique per test, so its containers (label gpud.model) are found and counted exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gpud import settings as config
from gpud.api.app import make_public_app
from gpud.daemon.services import Services, create_services
from gpud.runtime.base import LABEL_MODEL
from tests.integration.conftest import SOCKET_ENV, WORKER_IMAGE, engine_socket, open_runtime
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
API_KEY = "stack-key"


def examples_dir(runtime: str, base: Path) -> str:
    """Where the example workers are: baked into the image, or copied next to the test's files for the process
    runtime (its workers run as uid 65534, which may not be able to read a checkout under /root)."""
    if runtime != "process":
        return "/opt/gpud/examples"
    copy = base / "workers"
    shutil.copytree(REPO / "examples" / "workers", copy, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (copy, *copy.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return str(copy)


def presets_yaml(model_id: str, workers: str) -> str:
    """Presets for the example workers (in the directory `workers`) under this test's model id."""
    limits = "{memory: 256m, cpus: 1, pids: 64}"
    return (
        "models:\n"
        f"  {model_id}:\n"
        f"    stream: {{docker_image: '{WORKER_IMAGE}', command: [python3, {workers}/stream_text.py], mode: session,"
        f" readiness_timeout_seconds: 30, limits: {limits}}}\n"
        f"    oneoff: {{docker_image: '{WORKER_IMAGE}', command: [python3, {workers}/oneoff.py], mode: oneoff,"
        f" limits: {limits}}}\n"
        f"    blocked: {{docker_image: 'not-on-the-list:1', command: [python3, {workers}/oneoff.py]}}\n"
        # Allowed but never built; its registry is on loopback, so the failed pull never leaves the machine.
        f"    missing: {{docker_image: '127.0.0.1:9/gpud-worker-python:never-built',"
        f" command: [python3, {workers}/oneoff.py]}}\n"
    )


@dataclass
class SSEEvent:
    """One parsed server-sent event."""

    id: int
    event: str
    data: dict[str, Any]


def parse_sse(text: str) -> list[SSEEvent]:
    """Parse complete SSE frames (comments skipped)."""
    events = []
    for frame in text.split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in frame.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if "data" in fields:
            events.append(SSEEvent(int(fields["id"][0]), fields["event"][0], json.loads("\n".join(fields["data"]))))
    return events


@dataclass
class Stack:
    """Services + public app + HTTP client for one test."""

    runtime_name: str
    base: Path
    model_id: str
    services: Services
    server: TestServer
    session: aiohttp.ClientSession
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The public app's base URL."""
        return str(self.server.make_url(""))

    def body(self, task_type: str = "session", preset: str | None = None, **fields: Any) -> dict[str, Any]:
        """A submission for this test's model."""
        return {
            "task_type": task_type,
            "model_id": self.model_id,
            "task_preset": preset or ("stream" if task_type == "session" else "oneoff"),
            **fields,
        }

    async def submit(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST /api/tasks/submit; the caller reads (or closes) the response."""
        return await self.session.post(f"{self.url}/api/tasks/submit", json=body, headers={"X-API-Key": API_KEY})

    async def run(self, body: dict[str, Any]) -> list[SSEEvent]:
        """Submit and read the whole stream."""
        async with await self.submit(body) as response:
            assert response.status == 200, await response.text()
            return parse_sse(await response.text())

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        """GET a JSON route."""
        async with self.session.get(f"{self.url}{path}", headers={"X-API-Key": API_KEY}, **kwargs) as response:
            return response.status, await response.json()

    async def call(self, method: str, path: str) -> tuple[int, Any]:
        """Any other JSON route."""
        async with self.session.request(method, f"{self.url}{path}", headers={"X-API-Key": API_KEY}) as response:
            return response.status, await response.json()

    async def containers(self) -> list[Any]:
        """This test's containers (running or not)."""
        return await self.services.runtime.list({LABEL_MODEL: self.model_id})

    async def all_removed(self, timeout: float = 10.0) -> None:
        """Wait until none of this test's containers is left: a one-off's is removed just after its task_finish
        (gpud/work/oneoff.py), so right at task_finish it may still be there."""

        async def none_left() -> bool:
            return await self.containers() == []

        await wait_until(none_left, "this test's containers to be removed", timeout=timeout)


async def open_stack(runtime_name: str, env: dict[str, str] | None = None) -> Stack:
    """Build a stack on the named runtime (skips, or fails with GPUD_REQUIRE_ENGINES=1, if the engine is absent)."""
    socket = engine_socket(runtime_name) if runtime_name in SOCKET_ENV else None
    probe = await open_runtime(runtime_name)  # checks the engine answers and the image is there
    await probe.close()
    # Short, world-traversable base: worker sockets must fit AF_UNIX paths and be reachable by uid 65534.
    # Not under /tmp: the process runtime maps a worker's /tmp paths to its private tmpdir.
    base = Path(tempfile.mkdtemp(prefix="gpud-", dir="/var/tmp"))
    base.chmod(0o755)
    model_id = f"m-{uuid.uuid4().hex[:10]}"
    model_dir = base / "models" / model_id
    model_dir.mkdir(parents=True)
    (model_dir / "tokens.txt").write_text("alpha beta gamma delta epsilon zeta eta theta iota kappa\n")
    for path in (base / "models", model_dir):
        path.chmod(0o755)
    (model_dir / "tokens.txt").chmod(0o644)
    (base / "models.yaml").write_text(presets_yaml(model_id, examples_dir(runtime_name, base)))
    environ = {
        "GPUD_RUNTIME": runtime_name,
        "GPUD_RUNTIME_SOCKET": socket or "",
        "GPUD_GPU_BACKEND": "static",
        "GPU_DEVICE_IDS": "0,1",
        "GPU_DEVICE_DIFFICULTY": "0:low,1:high",
        "GPUD_STATE_DIR": str(base / "state"),
        "MODEL_CACHE_DIR": str(base / "models"),
        "AUTO_FETCH_MODELS": "false",
        "GPUD_PRESETS_FILE": str(base / "models.yaml"),
        "ALLOWED_DOCKER_IMAGES": "gpud-worker-python:*,localhost/gpud-worker-python:*,127.0.0.1:9/*",
        "INTERNAL_API_KEY": API_KEY,
        **(env or {}),
    }
    settings = config.load(None, environ={k: v for k, v in environ.items() if v})
    services = create_services(settings)
    await services.start()
    app: web.Application = make_public_app(services.for_api())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    return Stack(runtime_name, base, model_id, services, server, session, environ)


async def close_stack(stack: Stack) -> None:
    """Shut down like gpud does, then check nothing of this test is left in the engine."""
    await stack.session.close()
    await stack.server.close()
    await stack.services.tasks.shutdown()
    # Ask the engine through a runtime of our own: the stack's may point at a dead socket on purpose.
    checker = await open_runtime(stack.runtime_name)
    try:
        left = await checker.list({LABEL_MODEL: stack.model_id})
        for info in left:
            await checker.remove(info.id)
    finally:
        await checker.close()
    await stack.services.close()
    shutil.rmtree(stack.base, ignore_errors=True)
    assert not left, f"containers left after shutdown: {[c.id for c in left]}"
    assert not stack.services.scheduler.leases(), "GPU leases left after shutdown"


async def stack_fixture(runtime_name: str, env: dict[str, str] | None = None) -> AsyncIterator[Stack]:
    """Open a stack for a fixture and close it afterwards."""
    stack = await open_stack(runtime_name, env)
    try:
        yield stack
    finally:
        await close_stack(stack)


def runtimes() -> list[str]:
    """Runtimes the task tests run on (GPUD_TEST_RUNTIMES narrows it, e.g. for a quick local run)."""
    wanted = os.environ.get("GPUD_TEST_RUNTIMES")
    return wanted.split(",") if wanted else ["process", "podman", "docker"]
