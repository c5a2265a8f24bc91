"""Issue 11: the engine's API going away for 20 s in the middle of work. A real `gpud run` uses an engine service of
this test's own (tests/reliability/privengine.py); with a session task streaming and a one-off running, the
service is stopped for 20 s and started again on the same socket.

Expected: gpud does not crash; /health says degraded while the engine is away (new sessions and one-offs get 503
engine_unavailable, tasks on a live session are still taken: its worker talks to gpud, not to the engine) and ok
again by itself once it answers; a one-off running through it ends `completed` with its whole output; one that
exits meanwhile is seen to exit once the engine answers (with its whole output on Podman, whose conmon keeps
writing the log; on Docker, dockerd itself reads the output, so what it wrote meanwhile is gone and the task says
`output_truncated`); one cancelled meanwhile, and a session ended meanwhile, end at once and keep their GPU until
their container is removed (gpud/work/removals.py); the
session's worker serves a new task afterwards in the same container without loading its model again; every GPU
stays leased while its container may run; no container and no GPU lease is left.

Docker is covered too, with a dockerd of the test's own started with --live-restore (without it, stopping dockerd
stops its containers: an engine restart is then an exit of every worker, which gpud already reports as such): it
is the engine whose log stream breaks in an outage, so it is where reading the output again and skipping what was
delivered is exercised (Podman's output is read from its log file, which an outage does not interrupt).

Before: the wait for the session's container failed when the engine went away and counted as an exit of code -1,
so the session "crashed", its teardown could not stop the container, and its GPU was freed while the worker still
ran on it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.figures import Figures
from tests.integration.conftest import engine_missing, engine_socket
from tests.reliability.privengine import PrivateDocker, PrivateEngine, PrivatePodman
from tests.reliability.restartable import Restartable, close_restartable, open_restartable
from tests.security.isolation_kit import API_KEY
from tests.waiting import wait_until

OUTAGE_SECONDS = 20.0
ONEOFF_TOKENS = 500  # at 0.06 s each: the one-off runs through the whole outage
SESSION_TOKENS = 300  # at 0.1 s each: the session task too


@pytest.fixture(params=["podman", "docker"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[PrivateEngine]:
    shared = engine_socket(request.param)  # skips (or fails under GPUD_REQUIRE_ENGINES=1) without the engine
    private: PrivateEngine = PrivatePodman() if request.param == "podman" else PrivateDocker()
    try:
        private.start()
        if isinstance(private, PrivateDocker):
            private.load_image(shared)
    except Exception as exc:
        private.close()
        engine_missing(f"a private {request.param} engine could not be started: {exc}")
    try:
        yield private
    finally:
        private.close()


@pytest.fixture
async def host(tmp_path: Path, engine: PrivateEngine) -> AsyncIterator[Restartable]:
    opened = await open_restartable(tmp_path, engine.socket, gpus=5, GPUD_RUNTIME=engine.name)
    if engine.name == "docker":  # the helper reads containers through Podman; this test's engine is Docker
        from gpud.runtime import make_runtime

        await opened.engine.close()
        opened.engine = make_runtime("docker", engine.socket)
    try:
        yield opened
    finally:
        left = await close_restartable(opened)
        assert not left, f"containers left: {left}"


async def health(client: aiohttp.ClientSession, host: Restartable) -> tuple[int, dict]:
    """GET /health; status and report."""
    async with client.get(f"{host.url}/health") as response:
        return response.status, await response.json()


async def submit_status(client: aiohttp.ClientSession, host: Restartable, body: dict) -> tuple[int, dict]:
    """A submission expected to be refused: its status and error."""
    async with client.post(f"{host.url}/api/tasks/submit", json=body, headers={"X-API-Key": API_KEY}) as response:
        return response.status, await response.json()


async def test_engine_api_stopped_for_20_s_mid_work(host: Restartable, engine: PrivateEngine, figures: Figures) -> None:
    scenario = f"{engine.name} API stopped {OUTAGE_SECONDS:.0f} s"
    host.start()
    async with aiohttp.ClientSession() as client:
        first = await host.submit(client, host.body(max_tokens=2, delay=0))
        assert (await first.end())["status"] == "completed"
        session_id = str(next(e.data["session_id"] for e in first.events if e.data.get("session_id")))
        container_id = host.sessions()[session_id]["container_id"]
        second = await host.submit(client, host.body(max_tokens=2, delay=0))
        assert (await second.end())["status"] == "completed"
        ended = str(next(e.data["session_id"] for e in second.events if e.data.get("session_id")))
        streaming = await host.submit(client, host.body(session_id=session_id, max_tokens=SESSION_TOKENS, delay=0.1))
        oneoff = await host.submit(client, host.body("oneoff", "oneoff", max_tokens=ONEOFF_TOKENS, delay=0.06))
        # Exits about 4 s into the outage (seen only once the engine answers), and one cancelled during it.
        short = await host.submit(client, host.body("oneoff", "oneoff", max_tokens=100, delay=0.05))
        doomed = await host.submit(client, host.body("oneoff", "oneoff", max_tokens=1000, delay=0.1))
        for stream in (streaming, oneoff, short, doomed):
            await stream.wait("working")
        for stream in (oneoff, short, doomed):
            await wait_until(lambda s=stream: "token-2" in s.text, "the one-offs' output flowing", 30)

        figures.record(scenario, "engine stop took", engine.stop(), "s")
        down_at = time.monotonic()
        statuses = []
        status, error = await submit_status(client, host, host.body("oneoff", "oneoff", max_tokens=1))
        assert status == 503 and error["error"]["code"] == "engine_unavailable", error
        status, error = await submit_status(client, host, host.body(max_tokens=1))
        assert status == 503 and error["error"]["code"] == "engine_unavailable", error
        # The live session still takes tasks: its worker talks to gpud over its socket, not through the engine.
        during = await host.submit(client, host.body(session_id=session_id, max_tokens=3, delay=0))
        # A cancel the engine cannot carry out: the task ends at once, says its output is cut short, and its
        # container (which may still run) keeps its GPU until the engine removes it.
        async with client.delete(f"{host.url}/api/tasks/{doomed.task_id}", headers={"X-API-Key": API_KEY}) as reply:
            assert reply.status == 200, await reply.text()
        cancelled = await doomed.end(timeout=30)
        # A session ended meanwhile: it ends, and its GPU stays leased until the engine removes its container.
        async with client.delete(f"{host.url}/api/sessions/{ended}", headers={"X-API-Key": API_KEY}) as reply:
            assert reply.status == 200 and (await reply.json())["state"] == "stopped"
        assert cancelled["status"] == "cancelled" and cancelled.get("output_truncated") is True, cancelled
        assert any(e.data.get("stream") == "gpud" and "output truncated" in e.data["line"] for e in doomed.events)
        while time.monotonic() - down_at < OUTAGE_SECONDS:
            code, report = await health(client, host)
            statuses.append(code)
            assert code == 503 and report["status"] == "degraded" and not report["runtime"]["reachable"], report
            assert len(host.leases()) == 5, "every GPU stays leased: each may still have a container on it"
            await asyncio.sleep(0.5)
        assert host.daemon.proc is not None and host.daemon.proc.poll() is None, "gpud is still running"
        assert short.events[-1].event != "task_finish", "an exit the engine cannot report is not assumed"
        figures.record(scenario, "/health samples during it, all 503 degraded", len(statuses))

        figures.record(scenario, "engine start took", engine.start(), "s")
        up_at = time.monotonic()

        async def healthy() -> bool:
            return (await health(client, host))[0] == 200

        await wait_until(healthy, "/health ok again", 30, interval=0.05)
        figures.record(scenario, "/health ok after the engine answered", time.monotonic() - up_at, "s")

        finish = await short.end(timeout=60)
        figures.record(scenario, "exited one-off done after it answered", time.monotonic() - up_at, "s")
        whole = "".join(f"token-{i}\n" for i in range(100))
        if engine.name == "podman":  # conmon went on writing its log file: nothing is lost
            assert finish["status"] == "completed" and "output_truncated" not in finish, finish
            assert short.text == whole, "its whole output"
        else:  # dockerd reads a container's output itself: what it wrote and exited with meanwhile is gone
            assert finish["status"] == "completed" and finish.get("output_truncated") is True, finish
            assert whole.startswith(short.text) and len(short.text) < len(whole), "a true prefix, and says so"
            figures.record(scenario, "exited one-off: lines kept (truncated, said)", short.text.count("\n"), "/ 100")

        async def doomed_gone() -> bool:
            return doomed.task_id not in host.leases().values() and not [
                c for c in await host.containers() if c.labels.get("gpud.task_id") == doomed.task_id
            ]

        await wait_until(doomed_gone, "the cancelled one-off's container removed and its GPU free", 30)
        figures.record(scenario, "cancelled one-off removed after it answered", time.monotonic() - up_at, "s")

        async def ended_gone() -> bool:
            return ended not in host.leases().values() and not [
                c for c in await host.containers() if c.labels.get("gpud.session_id") == ended
            ]

        await wait_until(ended_gone, "the ended session's container removed and its GPU free", 30)
        figures.record(scenario, "ended session removed after it answered", time.monotonic() - up_at, "s")

        finish = await oneoff.end(timeout=120)
        figures.record(scenario, "running one-off done after it answered", time.monotonic() - up_at, "s")
        assert finish["status"] == "completed" and "output_truncated" not in finish, finish
        assert oneoff.text == "".join(f"token-{i}\n" for i in range(ONEOFF_TOKENS)), "the one-off's whole output"
        assert (await streaming.end())["status"] == "completed"
        assert (await during.end())["status"] == "completed"

        after = await host.submit(client, host.body(session_id=session_id, max_tokens=3, delay=0))
        assert (await after.end())["status"] == "completed"
        status, task = await host.get(client, f"/api/tasks/{after.task_id}")
        assert status == 200 and task["result"]["load_count"] == 1, "the same worker, its model loaded once"
        session = host.sessions()[session_id]
        assert session["container_id"] == container_id and session["state"] == "ready", session

        host.admin("DELETE", f"/api/sessions/{session_id}")

        async def nothing_left() -> bool:
            return not await host.containers() and not host.leases()

        await wait_until(nothing_left, "no container and no GPU lease left", 30)
    log = host.log
    assert "Traceback" not in log, log
    # Each outage is logged once per piece of work that met it (its wait, its output), not at every retry; its end
    # too, by all but the cancelled one-off (its wait was ended with it).
    went = re.findall(r"gpud.work.outage: (\S+ \S+): the container engine does not answer", log)
    back = re.findall(r"gpud.work.outage: (\S+ \S+): the container engine answers again", log)
    figures.record(scenario, "log lines: engine gone", len(went))
    assert went and max(Counter(went).values()) <= 2, went
    assert set(went) - set(back) <= {f"task {doomed.task_id}", f"session {ended}"}, (went, back)
