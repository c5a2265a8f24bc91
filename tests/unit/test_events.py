"""TaskEventLog: ids, replay, live waiting, several subscribers, the end of a log, and its bounds."""

from __future__ import annotations

import asyncio

import pytest

from gpud.work.events import Event, EventType, TaskEventLog
from tests.waiting import wait_until


def delta(log: TaskEventLog, text: str) -> Event | None:
    return log.append(EventType.TEXT_DELTA, {"delta": text})


async def drain(log: TaskEventLog, after_id: int = 0) -> list[Event]:
    return [event async for event in log.subscribe(after_id)]


def test_ids_start_at_one_and_data_carries_task_id() -> None:
    log = TaskEventLog("t1")
    first = log.append(EventType.CONNECTION, {"status": "gpu_allocated", "gpu_id": 0})
    second = delta(log, "hi\nthere")
    assert first is not None and second is not None
    assert (first.id, second.id) == (1, 2)
    assert first.data == {"status": "gpu_allocated", "gpu_id": 0, "task_id": "t1"}
    assert second.json == '{"delta":"hi\\nthere","task_id":"t1"}'
    assert log.last_id == 2


async def test_replay_after_id_then_finished_log_ends() -> None:
    log = TaskEventLog("t")
    for i in range(5):
        delta(log, str(i))
    log.finish({"status": "completed"})
    assert [e.id for e in await drain(log)] == [1, 2, 3, 4, 5, 6]
    replay = await drain(log, after_id=3)
    assert [e.id for e in replay] == [4, 5, 6]
    assert replay[-1].type is EventType.TASK_FINISH
    assert await drain(log, after_id=6) == []
    assert await drain(log, after_id=99) == []


async def test_live_continuation_after_replay() -> None:
    log = TaskEventLog("t")
    delta(log, "a")
    seen: list[str] = []

    async def reader() -> None:
        async for event in log.subscribe():
            seen.append(event.data.get("delta", event.type.value))

    task = asyncio.create_task(reader())
    # Replayed; the reader's only suspension point after an event is the live wait, so it now waits live.
    await wait_until(lambda: seen == ["a"], "the stored event to be replayed", timeout=5)
    assert log.subscribers == 1 and not task.done()
    delta(log, "b")
    await wait_until(lambda: seen == ["a", "b"], "the live event", timeout=5)
    log.finish({"status": "completed"})
    await asyncio.wait_for(task, 1)
    assert seen == ["a", "b", "task_finish"]


async def test_many_subscribers_see_the_same_sequence_and_a_slow_one_does_not_block() -> None:
    log = TaskEventLog("t")
    fast = [asyncio.create_task(drain(log)) for _ in range(3)]
    delta(log, "first")
    stalled = log.subscribe()
    first = await anext(stalled)  # this one stops reading after one event
    for i in range(999):
        delta(log, str(i))
        if i % 100 == 0:
            await asyncio.sleep(0)
    log.finish({"status": "completed"})
    results = await asyncio.wait_for(asyncio.gather(*fast), 2)
    for events in results:
        assert [e.id for e in events] == list(range(1, 1002))
    assert first.id == 1
    assert log.subscribers == 1  # the stalled one is still attached
    rest = [e async for e in stalled]
    assert rest[-1].id == 1001


async def test_subscriber_count_and_last_left_time() -> None:
    now = [100.0]
    log = TaskEventLog("t", clock=lambda: now[0])
    assert log.subscribers == 0 and log.last_left_at is None
    with log.attach() as a:
        with log.attach(after_id=0):
            assert log.subscribers == 2
        now[0] = 105.0
        assert log.subscribers == 1 and log.last_left_at is None
        assert a.take() == []
    assert log.subscribers == 0 and log.last_left_at == 105.0
    gen = log.subscribe()
    task = asyncio.create_task(anext(gen))
    await asyncio.sleep(0)
    assert log.subscribers == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await gen.aclose()
    assert log.subscribers == 0


def test_finish_is_final_and_idempotent() -> None:
    log = TaskEventLog("t")
    end = log.finish({"status": "cancelled"})
    assert end.type is EventType.TASK_FINISH and end.id == 1
    assert log.finish({"status": "completed"}) is end
    assert delta(log, "late") is None
    assert log.last_id == 1
    with pytest.raises(ValueError, match="finish"):
        log.append(EventType.TASK_FINISH, {})


async def test_over_max_events_deltas_are_coalesced_and_nothing_is_lost() -> None:
    log = TaskEventLog("t", max_events=10, coalesce_bytes=50, coalesce_interval=0.05)
    for i in range(10):
        delta(log, f"{i}.")
    assert log.last_id == 10
    assert delta(log, "a" * 20) is None  # buffered
    assert log.append(EventType.LOGS, {"stream": "stderr", "line": "x"}) is None  # dropped over the limit
    big = delta(log, "b" * 40)  # 60 buffered bytes >= 50: published as one event
    assert big is not None and big.id == 11 and big.data["delta"] == "a" * 20 + "b" * 40
    delta(log, "c")
    # Only the coalescing timer (0.05 s) can publish "c" now: no more appends come until it has.
    await wait_until(lambda: log.last_id == 12, "the coalescing timer to publish the slow trickle", timeout=5)
    assert log.events(11)[0].data["delta"] == "c"
    delta(log, "d")
    text = log.append(EventType.TEXT, {"text": "full"})  # control events flush the buffer first, in order
    assert text is not None and text.id == 14
    assert log.events(12)[0].data["delta"] == "d"
    end = log.finish({"status": "completed"})
    notice = log.events(end.id - 2)[0]
    assert notice.type is EventType.LOGS and "1 log/progress events dropped past 10 events" in notice.data["line"]
    whole = "".join(e.data.get("delta", "") for e in await drain(log))
    assert whole == "".join(f"{i}." for i in range(10)) + "a" * 20 + "b" * 40 + "cd"
    assert log.coalesced == 4


def test_output_limit_cuts_deltas_but_keeps_control_events() -> None:
    log = TaskEventLog("t", max_events=2, output_bytes=200, coalesce_bytes=10)
    delta(log, "x")
    delta(log, "y")
    assert delta(log, "z" * 500) is not None  # the part that fits (198 bytes) is kept
    assert delta(log, "more") is None
    assert log.output.text == "xy" + "z" * 198 and log.output.cut == 302 + 4
    assert log.append(EventType.TEXT, {"text": log.output.text}) is not None
    log.finish({"status": "completed"})
    assert [e.type for e in log.events()][-2:] == [EventType.LOGS, EventType.TASK_FINISH]
