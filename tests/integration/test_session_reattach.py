"""Session adoption, worker side (issue 11), on real engines: gpud's end of a live session's channel goes away
without `shutdown` (as when gpud is killed), the container keeps running, and a NEW SessionWorker re-attaches to
it: the worker reconnects to the socket re-created in the same (bind-mounted) directory, resumes with its model
still loaded, and runs a new task. Reconciliation (who calls reattach after a restart) is tested elsewhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpud.work.sessions.worker import SessionWorker
from gpud.worker.messages import WorkerEvent
from tests.integration.stack import Stack, runtimes, stack_fixture


@pytest.fixture(params=runtimes())
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async for opened in stack_fixture(request.param):
        yield opened


async def open_session(stack: Stack) -> str:
    events = await stack.run(stack.body("session", metadata={"max_tokens": 3, "delay": 0.01}))
    assert events[-1].event == "task_finish" and events[-1].data["status"] == "completed", events[-1].data
    return str(next(e for e in events if e.event == "connection").data["session_id"])


async def gpud_side_dies(worker: SessionWorker) -> None:
    """What gpud's death does to a session: its channel and its watchers end, no `shutdown` is sent, and the
    container is left running."""
    for task in worker._background:
        task.cancel()
    await worker.channel.close()


def a_new_gpuds_worker(stack: Stack, session_id: str, old: SessionWorker) -> SessionWorker:
    """The SessionWorker a restarted gpud builds for an adopted session (same directory, same worker uid)."""
    manager = stack.services.sessions
    session = manager.registry.get(session_id)
    return SessionWorker(
        stack.services.runtime,
        session.preset,
        session_id,
        "adopted",
        session.lease,
        stack.base / "models" / stack.model_id,
        old.channel.socket_dir,
        stack.base / "state" / "sdk",
        manager._users[session_id],
    )


async def test_a_new_session_worker_reattaches_and_the_model_is_not_loaded_again(stack: Stack) -> None:
    session_id = await open_session(stack)
    manager = stack.services.sessions
    old = manager._workers[session_id]  # the worker of the session as the old gpud ran it
    container_id = old.container_id
    assert container_id is not None and old.ready is not None and old.ready.info["load_count"] == 1

    await gpud_side_dies(old)
    new = a_new_gpuds_worker(stack, session_id, old)
    try:
        ready = await new.reattach(container_id, 30)
        assert ready.resumed and ready.info == old.ready.info and ready.pid == old.ready.pid
        events: list[WorkerEvent] = [e async for e in new.channel.run_task("t-after", {"max_tokens": 4, "delay": 0})]
        assert events[-1].data["status"] == "completed", [(e.type, e.data) for e in events]
        result: dict[str, Any] = next(e for e in events if e.type == "result").data
        assert result["load_count"] == 1, "the worker kept its model: no second setup()"
        assert [c.id for c in await stack.containers()] == [container_id], "no second container"
        assert not new.exited.done()
    finally:
        assert await new.stop()
    assert await stack.containers() == []
