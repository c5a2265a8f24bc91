"""Durable records (issue 11): tasks and sessions no longer in memory, and those from before a restart, answer from
the records database: GET /api/tasks/{id} and /api/sessions/{id}, and /events replays the task's `text` and
`task_finish` with the ids they had."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from gpud import settings as config
from gpud.api.app import make_public_app
from gpud.daemon.services import create_services
from tests.integration.stack import API_KEY, SSEEvent, Stack, parse_sse, stack_fixture


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async for opened in stack_fixture("process"):
        yield opened


async def replay(stack: Stack, task_id: str, last_event_id: int) -> list[SSEEvent]:
    headers = {"X-API-Key": API_KEY, "Last-Event-ID": str(last_event_id)}
    async with stack.session.get(f"{stack.url}/api/tasks/{task_id}/events", headers=headers) as response:
        assert response.status == 200
        return parse_sse(await response.text())


async def a_finished_session(stack: Stack) -> tuple[list[SSEEvent], str]:
    events = await stack.run(stack.body("session", metadata={"max_tokens": 3, "delay": 0}))
    assert events[-1].data["status"] == "completed"
    session_id = str(next(e.data["session_id"] for e in events if e.data.get("session_id")))
    status, _ = await stack.call("DELETE", f"/api/sessions/{session_id}")
    assert status == 200
    return events, session_id


async def check_answers_from_records(stack: Stack, events: list[SSEEvent], session_id: str) -> None:
    task_id = events[0].data["task_id"]
    text = next(e for e in events if e.event == "text")
    status, task = await stack.get(f"/api/tasks/{task_id}")
    assert status == 200 and task["status"] == "completed" and task["text"] == text.data["text"]
    assert task["result"]["load_count"] == 1 and task["session_id"] == session_id
    again = await replay(stack, task_id, 0)
    assert [(e.id, e.event, e.data) for e in again] == [(e.id, e.event, e.data) for e in events[-2:]]
    assert [e.event for e in await replay(stack, task_id, text.id)] == ["task_finish"]
    status, session = await stack.get(f"/api/sessions/{session_id}")
    assert status == 200 and session["state"] == "stopped" and session["end_reason"] == "killed"
    assert session["tasks_run"] == 1 and session["worker"]["load_count"] == 1
    status, body = await stack.call("POST", f"/api/sessions/{session_id}/keepalive")
    assert status == 410, body
    async with await stack.submit(stack.body("session", session_id=session_id)) as response:
        assert response.status == 410


async def test_work_out_of_memory_answers_from_the_records(stack: Stack) -> None:
    events, session_id = await a_finished_session(stack)
    services = stack.services
    assert services.journal.flush()
    services.tasks.registry.purge(now=time.time() + 10**6)  # as once the in-memory retention has passed
    services.sessions.purge(-(10**9))
    assert (await stack.get("/api/tasks"))[1]["tasks"] == []
    await check_answers_from_records(stack, events, session_id)


async def test_work_from_before_a_restart_answers_from_the_records(stack: Stack) -> None:
    events, session_id = await a_finished_session(stack)
    await stack.server.close()
    await stack.services.tasks.shutdown()
    await stack.services.close()
    settings = config.load(None, environ={k: v for k, v in stack.env.items() if v})
    stack.services = create_services(settings)  # the same state directory: the same instance and records
    await stack.services.start()
    stack.server = TestServer(make_public_app(stack.services.for_api()), host="127.0.0.1")
    await stack.server.start_server()
    await check_answers_from_records(stack, events, session_id)
