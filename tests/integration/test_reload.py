"""Reload applies every reloadable setting for real: each test changes one and watches its effect.

The daemon's own Reloader runs over a whole stack (process runtime: the settings do not depend on the engine);
the environment it re-reads is a dict the test changes, as an operator would edit /etc/gpud/gpud.env.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpud.daemon.reload import LoadRequest, Reloader
from gpud.daemon.services import create_services
from gpud.daemon.systemd import Notifier
from gpud.settings import RELOADABLE, load
from tests.fileservice import FileService
from tests.integration.stack import API_KEY, Stack, parse_sse, stack_fixture
from tests.nvml_standin import FakeNvml
from tests.waiting import wait_until

# Every reloadable setting and the test below that watches it take effect.
COVERED = {
    "gpu_device_difficulty": "test_difficulty_tags",
    "gpu_metrics_refresh_interval": "test_gpu_sampling_interval",
    "session_idle_timeout_seconds": "test_idle_timeout_ends_a_live_session",
    "session_max_lifetime_seconds": "test_max_lifetime_ends_a_live_session",
    "session_queue_max_size": "test_queue_size",
    "session_evict_idle": "test_session_eviction",
    "default_task_timeout": "test_task_timeouts",
    "max_task_timeout": "test_task_timeouts",
    "client_gone_grace_seconds": "test_client_gone_grace",
    "task_retention_seconds": "test_task_retention",
    "record_retention_seconds": "test_record_retention",
    "sse_heartbeat_seconds": "test_heartbeat",
    "sse_send_timeout_seconds": "test_sse_send_timeout",
    "task_output_max_bytes": "test_output_and_log_limits",
    "text_delta_max_bytes": "test_output_and_log_limits",
    "task_logs_max_bytes": "test_output_and_log_limits",
    "log_line_max_bytes": "test_output_and_log_limits",
    "task_retention_max_bytes": "test_task_retention_budget",
    "auto_fetch_models": "test_auto_fetch",
    "file_service_url": "test_file_service_url",
    "file_service_internal_key": "test_file_service_key",
    "file_service_key_header": "test_file_service_key_header",
    "allowed_docker_images": "test_image_allowlist",
    "internal_api_key": "test_api_keys",
    "metrics_public": "test_metrics_public",
    "log_level": "test_log_level",
    "presets_file": "test_presets_file",
    "model_archive_max_bytes": "test_model_fetch_limits",
    "model_archive_max_ratio": "test_model_fetch_limits",
    "model_archive_max_entries": "test_model_fetch_limits",
    "model_archive_max_depth": "test_model_fetch_limits",
    "model_archive_max_path": "test_model_fetch_limits",
    "model_fetch_min_rate": "test_model_fetch_limits",
    "model_fetch_rate_window": "test_model_fetch_limits",
    "model_fetch_deadline": "test_model_fetch_limits",
}


@dataclass
class Reloading:
    """A stack, the environment its settings come from, and the daemon's reloader over it."""

    stack: Stack
    environ: dict[str, str]
    reloader: Reloader

    async def reload(self, **changes: str) -> dict[str, Any]:
        """Change environment variables, reload, and check every changed setting was applied."""
        self.environ.update(changes)
        result = await self.reloader.reload()
        assert result["reloaded"], result
        return result


def reloader_for(services: Any, environ: dict[str, str]) -> Reloader:
    return Reloader(LoadRequest(None, {}, False, environ), services, Notifier(environ={}))


async def reloading(env: dict[str, str] | None = None) -> AsyncIterator[Reloading]:
    async for stack in stack_fixture("process", env):
        environ = {k: v for k, v in stack.env.items() if v}
        yield Reloading(stack, environ, reloader_for(stack.services, environ))


@pytest.fixture
async def r() -> AsyncIterator[Reloading]:
    async for item in reloading():
        yield item


def test_every_reloadable_setting_has_a_test() -> None:
    assert set(COVERED) == RELOADABLE
    assert all(name in globals() for name in COVERED.values())


async def submit_status(stack: Stack, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """The status of a submit, with the JSON error body when it is not a stream."""
    async with await stack.submit(body) as response:
        if response.status == 200:
            await response.read()
            return 200, None
        return response.status, await response.json()


async def test_difficulty_tags(r: Reloading) -> None:
    result = await r.reload(GPU_DEVICE_DIFFICULTY="0:high,1:high")
    assert "gpu_device_difficulty" in result["applied"]
    status, body = await submit_status(r.stack, r.stack.body("oneoff", task_difficulty="low"))
    assert status == 503 and body and body["error"]["code"] == "no_gpu_for_difficulty"
    assert (await r.stack.run(r.stack.body("oneoff", task_difficulty="high")))[-1].data["status"] == "completed"


async def test_gpu_sampling_interval(tmp_path: Path) -> None:
    environ = {"GPUD_GPU_BACKEND": "nvml", "GPU_METRICS_REFRESH_INTERVAL": "3600", "GPUD_STATE_DIR": str(tmp_path)}
    environ["GPUD_PRESETS_FILE"] = str(Path(__file__).resolve().parents[2] / "etc" / "gpud" / "models.yaml")
    nvml = FakeNvml(count=1)
    services = create_services(load(None, environ=environ), nvml=nvml)
    await services.start()
    try:
        await wait_until(lambda: nvml.memory_reads >= 2, "the first sample of the refresh loop")
        before = nvml.memory_reads  # the one at start, the loop's first; the next would be an hour away
        environ["GPU_METRICS_REFRESH_INTERVAL"] = "0.05"
        result = await reloader_for(services, environ).reload()
        assert "gpu_metrics_refresh_interval" in result["applied"]
        await wait_until(lambda: nvml.memory_reads >= before + 5, "samples every 50 ms after the reload")
    finally:
        await services.close()


async def open_session(stack: Stack) -> str:
    events = await stack.run(stack.body("session", metadata={"max_tokens": 2, "delay": 0.01}))
    assert events[-1].data["status"] == "completed", events[-1].data
    return next(e.data["session_id"] for e in events if e.event == "connection")


async def session_ended(stack: Stack, session_id: str) -> str | None:
    _, body = await stack.get(f"/api/sessions/{session_id}")
    return body["end_reason"] if body["state"] == "stopped" else None


async def test_idle_timeout_ends_a_live_session(r: Reloading) -> None:
    session_id = await open_session(r.stack)
    await r.reload(SESSION_IDLE_TIMEOUT_SECONDS="0.2")
    assert await wait_until(lambda: session_ended(r.stack, session_id), "the session to end") == "idle_timeout"


async def test_max_lifetime_ends_a_live_session(r: Reloading) -> None:
    session_id = await open_session(r.stack)
    await r.reload(SESSION_MAX_LIFETIME_SECONDS="0.1")
    assert await wait_until(lambda: session_ended(r.stack, session_id), "the session to end") == "max_lifetime"


async def test_queue_size(r: Reloading) -> None:
    session_id = await open_session(r.stack)
    await r.reload(SESSION_QUEUE_MAX_SIZE="1")
    long = r.stack.body("session", session_id=session_id, metadata={"max_tokens": 50, "delay": 0.1})
    async with await r.stack.submit(long) as running:
        await running.content.readuntil(b"event: worker")  # running now
        async with await r.stack.submit(r.stack.body("session", session_id=session_id)) as queued:
            assert queued.status == 200
            status, body = await submit_status(r.stack, r.stack.body("session", session_id=session_id))
            assert status == 429 and body and body["error"]["code"] == "session_queue_full"
        await r.stack.call("DELETE", f"/api/sessions/{session_id}")


async def test_session_eviction(r: Reloading) -> None:
    idle = await open_session(r.stack)  # holds GPU 0, the only 'low' one
    await r.reload(GPUD_SESSION_EVICT_IDLE="false")
    status, body = await submit_status(r.stack, r.stack.body("session"))
    assert status == 503 and body and body["error"]["code"] == "no_gpu_available"
    await r.reload(GPUD_SESSION_EVICT_IDLE="true")
    assert (await open_session(r.stack)) != idle
    assert await session_ended(r.stack, idle) == "evicted"


async def test_task_timeouts(r: Reloading) -> None:
    await r.reload(DEFAULT_TASK_TIMEOUT="7", MAX_TASK_TIMEOUT="50")
    events = await r.stack.run(r.stack.body("oneoff"))
    _, task = await r.stack.get(f"/api/tasks/{events[0].data['task_id']}")
    assert task["timeout_seconds"] == 7
    status, body = await submit_status(r.stack, r.stack.body("oneoff", timeout_seconds=100))
    assert status == 400 and body and "MAX_TASK_TIMEOUT 50" in body["error"]["message"]


async def test_client_gone_grace(r: Reloading) -> None:
    session_id = await open_session(r.stack)
    await r.reload(GPUD_CLIENT_GONE_GRACE_SECONDS="0.2")
    body = r.stack.body("session", session_id=session_id, metadata={"max_tokens": 400, "delay": 0.05})
    async with await r.stack.submit(body) as response:
        task_id = parse_sse((await response.content.readuntil(b"\n\n")).decode())[0].data["task_id"]

    async def cancelled() -> str | None:
        _, task = await r.stack.get(f"/api/tasks/{task_id}")
        return task["error"]["code"] if task["status"] == "cancelled" else None

    assert await wait_until(cancelled, "the abandoned task to be cancelled", timeout=10) == "client_gone"


async def listed(r: Reloading, task_id: str) -> bool:
    """Whether GET /api/tasks (the tasks in memory) lists the task."""
    return any(task["task_id"] == task_id for task in (await r.stack.get("/api/tasks"))[1]["tasks"])


async def test_task_retention(r: Reloading) -> None:
    events = await r.stack.run(r.stack.body("oneoff"))
    task_id = events[0].data["task_id"]
    assert await listed(r, task_id)
    await r.reload(GPUD_TASK_RETENTION_SECONDS="0.1")

    async def forgotten() -> bool:
        return not await listed(r, task_id)

    await wait_until(forgotten, "the finished task to leave memory")
    # Out of memory, it still answers from the records (GPUD_RECORD_RETENTION_SECONDS), as after a restart.
    status, task = await r.stack.get(f"/api/tasks/{task_id}")
    assert status == 200 and task["status"] == "completed"


async def test_record_retention(r: Reloading) -> None:
    events = await r.stack.run(r.stack.body("oneoff"))
    path = f"/api/tasks/{events[0].data['task_id']}"
    await r.reload(GPUD_TASK_RETENTION_SECONDS="0.1")
    assert (await r.stack.get(path))[0] == 200
    await r.reload(GPUD_RECORD_RETENTION_SECONDS="0.1")

    async def forgotten() -> bool:
        return (await r.stack.get(path))[0] == 404

    await wait_until(forgotten, "the finished task's record to be purged")


async def test_heartbeat(r: Reloading) -> None:
    session_id = await open_session(r.stack)
    await r.reload(GPUD_SSE_HEARTBEAT_SECONDS="0.1")
    long = r.stack.body("session", session_id=session_id, metadata={"max_tokens": 30, "delay": 0.1})
    async with await r.stack.submit(long) as running:
        await running.content.readuntil(b"event: worker")
        # Queued behind the long task, this stream stays quiet apart from heartbeats.
        async with await r.stack.submit(r.stack.body("session", session_id=session_id)) as queued:
            await queued.content.readuntil(b"queue_position")
            assert b": ping" in await queued.content.readuntil(b": ping")
        await r.stack.call("DELETE", f"/api/sessions/{session_id}")


async def test_output_and_log_limits(r: Reloading) -> None:
    await r.reload(GPUD_TASK_OUTPUT_MAX_BYTES="10", GPUD_TEXT_DELTA_MAX_BYTES="4", GPUD_LOG_LINE_MAX_BYTES="8")
    events = await r.stack.run(r.stack.body("oneoff", metadata={"prompt": "alpha beta gamma"}))
    deltas = [e.data["delta"] for e in events if e.event == "text_delta"]
    assert "".join(deltas) == "alpha\nbeta" and max(len(d) for d in deltas) <= 4
    (line,) = [e.data["line"] for e in events if e.event == "logs" and e.data["stream"] == "stderr"]
    assert line.startswith("oneoff: … [") and line.endswith("more bytes cut by gpud]")
    await r.reload(GPUD_TASK_LOGS_MAX_BYTES="10")
    events = await r.stack.run(r.stack.body("oneoff", metadata={"prompt": "alpha"}))
    assert not [e for e in events if e.event == "logs" and e.data["stream"] == "stderr"]
    notice = next(e.data["line"] for e in events if e.event == "logs" and e.data["stream"] == "gpud")
    assert "1 log/progress events over the 10 bytes log limit dropped" in notice


async def test_task_retention_budget(r: Reloading) -> None:
    first = (await r.stack.run(r.stack.body("oneoff", metadata={"prompt": "alpha"})))[0].data["task_id"]
    assert "released" not in (await r.stack.get(f"/api/tasks/{first}"))[1]
    await r.reload(GPUD_TASK_RETENTION_MAX_BYTES="1")
    second = (await r.stack.run(r.stack.body("oneoff", metadata={"prompt": "beta"})))[0].data["task_id"]
    for task_id in (first, second):  # over the budget: both released, the records kept
        status, task = await r.stack.get(f"/api/tasks/{task_id}")
        assert status == 200 and task["released"] is True and task["text"] == ""


async def test_sse_send_timeout(r: Reloading, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpud.api.sse")
    # About 10 MB of events: more than the kernel buffers between gpud and a client that never reads.
    events = await r.stack.run(r.stack.body("oneoff", metadata={"max_tokens": 400_000}))
    task = r.stack.services.tasks.registry.get(events[0].data["task_id"])
    await r.reload(GPUD_SSE_SEND_TIMEOUT_SECONDS="0.5")
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:  # a client that asks and never reads
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (r.stack.server.host, r.stack.server.port))
        request = f"GET /api/tasks/{task.id}/events HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        await wait_until(lambda: task.log.subscribers == 1, "the stalled client to attach", timeout=10)
        await wait_until(lambda: task.log.subscribers == 0, "the stalled client to be dropped", timeout=10)
    assert "took no data for 0.5s" in caplog.text


async def fetching(service: FileService, tmp_path: Path, **env: str) -> AsyncIterator[Reloading]:
    """A stack whose model must come from the file service, which serves it."""
    async for item in reloading(env):
        model_dir = item.stack.base / "models" / item.stack.model_id
        shutil.copytree(model_dir, tmp_path / "tree")
        shutil.rmtree(model_dir)
        service.add_tree(item.stack.model_id, tmp_path / "tree", tmp_path / "model.tar")
        yield item


async def oneoff_outcome(stack: Stack) -> tuple[str, str | None]:
    finish = (await stack.run(stack.body("oneoff")))[-1].data
    return finish["status"], (finish.get("error") or {}).get("code")


async def test_auto_fetch(svc: FileService, tmp_path: Path) -> None:
    env = {"FILE_SERVICE_URL": svc.url, "FILE_SERVICE_INTERNAL_KEY": svc.key or "", "AUTO_FETCH_MODELS": "false"}
    async for r in fetching(svc, tmp_path, **env):
        status, body = await submit_status(r.stack, r.stack.body("oneoff"))
        assert status == 404 and body and body["error"]["code"] == "model_not_cached"
        await r.reload(AUTO_FETCH_MODELS="true")
        assert await oneoff_outcome(r.stack) == ("completed", None)
        assert svc.requests[r.stack.model_id] == 1


async def test_file_service_url(svc: FileService, tmp_path: Path) -> None:
    elsewhere = FileService(key=svc.key)  # serves nothing: every model is unknown there
    await elsewhere.start()
    try:
        env = {"FILE_SERVICE_URL": elsewhere.url, "FILE_SERVICE_INTERNAL_KEY": svc.key or ""}
        async for r in fetching(svc, tmp_path, AUTO_FETCH_MODELS="true", **env):
            assert await oneoff_outcome(r.stack) == ("failed", "model_fetch_failed")
            await r.reload(FILE_SERVICE_URL=svc.url)
            assert await oneoff_outcome(r.stack) == ("completed", None)
            assert elsewhere.requests[r.stack.model_id] == 1 and svc.requests[r.stack.model_id] == 1
    finally:
        await elsewhere.stop()


async def test_file_service_key(svc: FileService, tmp_path: Path) -> None:
    env = {"FILE_SERVICE_URL": svc.url, "FILE_SERVICE_INTERNAL_KEY": "wrong-key", "AUTO_FETCH_MODELS": "true"}
    async for r in fetching(svc, tmp_path, **env):
        assert await oneoff_outcome(r.stack) == ("failed", "model_fetch_failed")
        await r.reload(FILE_SERVICE_INTERNAL_KEY=svc.key or "")
        assert await oneoff_outcome(r.stack) == ("completed", None)


async def fetch_refused_by(stack: Stack, setting: str) -> None:
    """A one-off fails to fetch its model, the message naming `setting`; nothing stays in the cache."""
    finish = (await stack.run(stack.body("oneoff")))[-1].data
    assert finish["status"] == "failed" and finish["error"]["code"] == "model_fetch_failed", finish
    assert setting in finish["error"]["message"], finish
    assert not (stack.base / "models" / stack.model_id).exists()


async def test_model_fetch_limits(svc: FileService, tmp_path: Path) -> None:
    env = {"FILE_SERVICE_URL": svc.url, "FILE_SERVICE_INTERNAL_KEY": svc.key or "", "AUTO_FETCH_MODELS": "true"}
    async for r in fetching(svc, tmp_path, **env):
        model = r.stack.model_id
        # 20 MiB of zeros in ~20 KB: over the default ratio cap (50 x the download + 16 MiB).
        (tmp_path / "tree" / "sub").mkdir()
        (tmp_path / "tree" / "sub" / "zeros.bin").write_bytes(bytes(20 << 20))
        svc.add_tree(model, tmp_path / "tree", tmp_path / "model.tar.gz", gzip=True)
        await fetch_refused_by(r.stack, "GPUD_MODEL_ARCHIVE_MAX_RATIO")
        await r.reload(GPUD_MODEL_ARCHIVE_MAX_RATIO="none")
        tight = {  # setting: (a value that refuses this model, the default)
            "GPUD_MODEL_ARCHIVE_MAX_ENTRIES": ("1", "20000"),
            "GPUD_MODEL_ARCHIVE_MAX_DEPTH": ("1", "32"),
            "GPUD_MODEL_ARCHIVE_MAX_PATH": ("3", "1024"),
            "GPUD_MODEL_ARCHIVE_MAX_BYTES": ("1k", "1t"),
        }
        for name, (value, default) in tight.items():
            await r.reload(**{name: value})
            await fetch_refused_by(r.stack, name)
            await r.reload(**{name: default})
        assert await oneoff_outcome(r.stack) == ("completed", None)
        # A slow service (~20 KiB/s, about 1 s for this model): the rate, its window, the deadline.
        await r.stack.services.models.remove(model)
        svc.set(model, chunk_delay=0.05, chunk_size=1024)
        await r.reload(GPUD_MODEL_FETCH_MIN_RATE="1m", GPUD_MODEL_FETCH_RATE_WINDOW="0.2")
        await fetch_refused_by(r.stack, "GPUD_MODEL_FETCH_MIN_RATE")
        await r.reload(GPUD_MODEL_FETCH_RATE_WINDOW="30")  # the body ends before a window does
        assert await oneoff_outcome(r.stack) == ("completed", None)
        await r.stack.services.models.remove(model)
        await r.reload(GPUD_MODEL_FETCH_DEADLINE="0.3")
        await fetch_refused_by(r.stack, "GPUD_MODEL_FETCH_DEADLINE")


async def test_file_service_key_header(tmp_path: Path) -> None:
    svc = FileService(key_header="X-Model-Key")
    await svc.start()
    try:
        env = {"FILE_SERVICE_URL": svc.url, "FILE_SERVICE_INTERNAL_KEY": svc.key or "", "AUTO_FETCH_MODELS": "true"}
        async for r in fetching(svc, tmp_path, **env):
            assert await oneoff_outcome(r.stack) == ("failed", "model_fetch_failed")  # sent as X-Internal-Key
            await r.reload(GPUD_FILE_SERVICE_KEY_HEADER="X-Model-Key")
            assert await oneoff_outcome(r.stack) == ("completed", None)
    finally:
        await svc.stop()


async def test_image_allowlist(r: Reloading) -> None:
    status, body = await submit_status(r.stack, r.stack.body("oneoff", preset="blocked"))
    assert status == 403 and body and body["error"]["code"] == "image_not_allowed"
    await r.reload(ALLOWED_DOCKER_IMAGES=r.environ["ALLOWED_DOCKER_IMAGES"] + ",not-on-the-list:*")
    # The process runtime ignores images, so the allowed preset runs its command.
    assert (await r.stack.run(r.stack.body("oneoff", preset="blocked")))[-1].data["status"] == "completed"


async def status_with_key(stack: Stack, path: str, key: str | None) -> int:
    headers = {"X-API-Key": key} if key else {}
    async with aiohttp.ClientSession() as session, session.get(f"{stack.url}{path}", headers=headers) as response:
        return response.status


async def test_api_keys(r: Reloading) -> None:
    await r.reload(INTERNAL_API_KEY="rotated-key")
    assert await status_with_key(r.stack, "/api/tasks", API_KEY) == 401
    assert await status_with_key(r.stack, "/api/tasks", "rotated-key") == 200


async def test_metrics_public(r: Reloading) -> None:
    assert await status_with_key(r.stack, "/metrics", None) == 401
    await r.reload(GPUD_METRICS_PUBLIC="true")
    assert await status_with_key(r.stack, "/metrics", None) == 200


async def test_log_level(r: Reloading) -> None:
    root = logging.getLogger()
    before = root.level
    try:
        await r.reload(GPUD_LOG_LEVEL="error")
        assert root.level == logging.ERROR
    finally:
        root.setLevel(before)


async def test_presets_file(r: Reloading) -> None:
    extra = r.stack.base / "more-models.yaml"
    lines = (r.stack.base / "models.yaml").read_text().splitlines()
    oneoff = next(line for line in lines if line.startswith("    oneoff:"))
    extra.write_text("\n".join([*lines, oneoff.replace("oneoff:", "oneoff-too:", 1)]) + "\n")
    result = await r.reload(GPUD_PRESETS_FILE=str(extra))
    assert "presets_file" in result["applied"]
    assert f"{r.stack.model_id}/oneoff-too" in result["presets_changed"]
    assert (await r.stack.run(r.stack.body("oneoff", preset="oneoff-too")))[-1].data["status"] == "completed"


async def test_a_restart_only_setting_is_reported_not_applied(r: Reloading) -> None:
    result = await r.reload(GPUD_MAX_REQUEST_BYTES="2m")
    assert result["needs_restart"] == ["max_request_bytes"] and result["applied"] == []
    assert r.stack.services.settings.max_request_bytes == 1024 * 1024
