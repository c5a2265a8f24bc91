"""Issue 11: gpud killed, and its engine's API down when it starts again. gpud still starts (and says why it cannot
reconcile), leases no GPU and lets no task into a session it has not yet adopted; once the engine answers, the
sessions are adopted as after any restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.figures import Figures
from tests.integration.conftest import engine_socket
from tests.reliability.privengine import PrivatePodman, answers
from tests.reliability.restartable import close_restartable, fresh_client, open_restartable, open_sessions
from tests.security.isolation_kit import API_KEY
from tests.waiting import wait_until


@pytest.fixture
def podman() -> Iterator[PrivatePodman]:
    engine_socket("podman")  # skip (or fail under GPUD_REQUIRE_ENGINES=1) where the test engines are absent
    engine = PrivatePodman()
    engine.start()
    try:
        yield engine
    finally:
        engine.close()


@pytest.mark.timeout(600)
async def test_sessions_are_adopted_once_the_engine_answers(
    tmp_path: Path, podman: PrivatePodman, figures: Figures
) -> None:
    host = await open_restartable(tmp_path, podman.socket, gpus=3)
    try:
        host.start()
        async with fresh_client() as client:
            sessions = await open_sessions(host, client, 2)
            before = {s: r["gpu_id"] for s, r in host.sessions().items()}
            host.kill9()
            podman.stop()
            host.start()
            assert "cannot reconcile with the engine yet" in host.log
            assert host.sessions() == {} and host.leases() == {}
            body = host.body(session_id=sessions[0], max_tokens=1, delay=0)
            async with client.post(f"{host.url}/api/tasks/submit", json=body, headers={"X-API-Key": API_KEY}) as r:
                refused = await r.json()
            assert r.status == 503 and refused["error"]["code"] == "session_restoring", refused
            back = time.monotonic()
            podman.start()
            await wait_until(lambda: host.sessions().keys() == set(sessions), "the sessions adopted", timeout=60.0)
            figures.record("engine down at restart", "engine back to sessions adopted", time.monotonic() - back, "s")
            assert {s: r["gpu_id"] for s, r in host.sessions().items()} == before
            assert host.leases() == {gpu: s for s, gpu in before.items()}
            for session_id in sessions:
                stream = await host.submit(client, host.body(session_id=session_id, max_tokens=2, delay=0))
                assert (await stream.end())["status"] == "completed"
                status, task = await host.get(client, f"/api/tasks/{stream.task_id}")
                assert task["result"]["load_count"] == 1, task
            oneoff = await host.submit(client, host.body("oneoff", "oneoff", prompt="a b", delay=0))
            assert (await oneoff.end())["status"] == "completed"  # leases are granted again
    finally:
        if not answers(podman.socket):  # the cleanup asks the engine
            podman.start()
        left = await close_restartable(host)
        assert not left, left
