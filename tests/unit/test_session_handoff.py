"""A task for an idle session's worker starts from the submitting request's own step (SessionManager.enqueue), and
the send to the worker follows as the loop's next callback. These tests race that window: a cancel, a kill, a
second task and a dead worker arriving in the same step, before the session's own task has woken to supervise it.

Real manager, channel, SDK and worker process (the harness of test_session_timers); only time is manual.
"""

from __future__ import annotations

import os
import signal

from gpud.work.event import EventType
from gpud.work.sessions.record import SessionState
from gpud.work.task import TaskStatus
from tests.unit import test_session_timers
from tests.unit.test_session_timers import Harness, finished, saw
from tests.waiting import wait_until

harness = test_session_timers.harness  # the same fixture: a session manager over real parts, on a manual clock


def worker_statuses(task_events: list) -> list[str]:
    return [e.data["status"] for e in task_events if e.type is EventType.WORKER]


async def test_an_idle_session_s_task_says_working_with_connection_and_is_never_queued(harness: Harness) -> None:
    session, _ = await harness.open()
    task = harness.task(max_tokens=2, delay=0.0)
    harness.manager.enqueue(session, task)
    # Before any await: the task is the session's current one, running, and its first two events are there to be
    # written together.
    assert session.current is task and session.state is SessionState.WORKING and task.status is TaskStatus.RUNNING
    assert [e.type for e in task.log.events()] == [EventType.CONNECTION, EventType.WORKER]
    assert worker_statuses(task.log.events()) == ["working"]
    await finished(task)
    assert task.status is TaskStatus.COMPLETED and task.result and task.result["load_count"] == 1
    assert "queued" not in worker_statuses(task.log.events())


async def test_a_cancel_in_the_same_step_stops_the_task_and_keeps_the_session(harness: Harness) -> None:
    session, _ = await harness.open()
    task = harness.task(max_tokens=50, delay=0.05)
    harness.manager.enqueue(session, task)
    assert await task.cancel()  # no await suspends before this: the task is not even sent yet
    await finished(task)
    assert task.status is TaskStatus.CANCELLED and task.error and task.error.code == "cancelled"
    assert task.text.count(" ") < 49, "the worker was told to stop"
    after = harness.task(max_tokens=2, delay=0.0)
    harness.manager.enqueue(session, after)
    await finished(after)
    assert after.status is TaskStatus.COMPLETED and after.result and after.result["load_count"] == 1


async def test_a_kill_in_the_same_step_ends_the_task_and_frees_the_gpu(harness: Harness) -> None:
    session, _ = await harness.open()
    task = harness.task(max_tokens=50, delay=0.05)
    harness.manager.enqueue(session, task)
    await harness.manager.kill(session)
    assert task.final and task.status is TaskStatus.CANCELLED and task.error
    assert task.error.code == "session_killed"
    assert session.is_over and harness.scheduler.leases() == []


async def test_two_tasks_in_one_step_the_first_goes_at_once_the_second_waits_its_turn(harness: Harness) -> None:
    session, _ = await harness.open()
    first = harness.task(max_tokens=3, delay=0.01)
    second = harness.task(max_tokens=1, delay=0.0)
    harness.manager.enqueue(session, first)
    harness.manager.enqueue(session, second)
    assert session.current is first and list(session.queue) == [second]
    queued = [e.data for e in second.log.events() if e.type is EventType.WORKER]
    assert queued == [{**queued[0], "status": "queued", "queue_position": 1}]
    await finished(second)
    assert first.status is TaskStatus.COMPLETED and second.status is TaskStatus.COMPLETED
    assert first.finished_at is not None and second.started_at is not None
    assert second.started_at >= first.finished_at, "one task at a time, in order"
    assert saw(second, "working")


async def test_a_worker_killed_just_before_the_hand_off_fails_the_task_at_once(harness: Harness) -> None:
    session, _ = await harness.open()
    pid = session.ready_info["pid"]
    os.kill(pid, signal.SIGKILL)
    task = harness.task(max_tokens=2, delay=0.0)
    harness.manager.enqueue(session, task)  # gpud has not seen the worker die yet: the task goes to a dead worker
    await finished(task)  # and fails as a crash, without waiting out its timeout (the clock never moves)
    assert task.status is TaskStatus.FAILED and task.error and task.error.code == "worker_crashed"
    await wait_until(lambda: session.is_over, "the session to end")
    assert harness.scheduler.leases() == []
