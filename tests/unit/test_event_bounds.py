"""The bounds of a task's events and output, and events that always encode (security review, findings 3 and 4)."""

from __future__ import annotations

import json
import math

import pytest

from gpud.jsonsafe import UnsafeJSON, dumps_safe, loads_strict, sanitize
from gpud.settings.presets import Preset
from gpud.work.events import EventLimits, EventType, TaskEventLog
from gpud.work.registry import TaskRegistry
from gpud.work.request import TaskRequest, TaskType
from gpud.work.task import Task, TaskError, TaskStatus
from gpud.work.textcap import LongLines, TextBuffer, cut_utf8, split_utf8, truncate_line, utf8_len


def make_task(**limits: int) -> Task:
    request = TaskRequest(TaskType.ONEOFF, "low", "m", "p", 10.0)
    return Task(request=request, preset=Preset(model_id="m", name="p", image="i"), limits=EventLimits(**limits))


def stored_bytes(log: TaskEventLog) -> int:
    return sum(len(e.json_bytes) for e in log.events())


# --- text helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", range(0, 14))
def test_cuts_never_split_a_character(limit: int) -> None:
    text = "aé€😀b" * 2
    kept = cut_utf8(text, limit)
    assert text.startswith(kept) and utf8_len(kept) <= limit
    assert utf8_len(kept) > limit - 4, "at most one character (4 bytes) short"
    pieces = list(split_utf8(text, max(limit, 4)))
    assert "".join(pieces) == text and all(utf8_len(p) <= max(limit, 4) for p in pieces)


def test_text_buffer_holds_at_most_its_limit_and_counts_the_rest() -> None:
    buffer = TextBuffer(10)
    kept = [buffer.append("abc") for _ in range(5)]
    assert kept == ["abc", "abc", "abc", "a", ""] and buffer.text == "abcabcabca"
    assert (buffer.size, buffer.cut) == (10, 5)
    assert buffer.replace("x" * 30) == "x" * 10 and buffer.cut == 20


def test_a_million_tiny_pieces_are_joined_in_batches() -> None:
    buffer = TextBuffer(1 << 30)
    for _ in range(100_000):
        buffer.append("z")
    assert len(buffer.pieces()) < 1200 and buffer.text == "z" * 100_000  # not 100,000 string objects


def test_truncated_line_says_how_much_was_cut() -> None:
    line, cut = truncate_line("x" * 100, 10, dropped=1000)
    assert line == "x" * 10 + "… [1090 more bytes cut by gpud]" and cut == 1090
    assert truncate_line("short", 10) == ("short", 0)


def test_long_lines_from_pieces_become_one_line_per_stream() -> None:
    joiner = LongLines()
    assert joiner.feed("stderr", "ab", partial=True) is None
    assert joiner.feed("stdout", "whole", partial=False) == ("whole", 0)
    assert joiner.feed("stderr", "cd", partial=True) is None
    assert joiner.feed("stderr", "é", partial=False) == ("ab", 4)
    assert joiner.feed("stderr", "open", partial=True) is None
    assert joiner.flush() == [("stderr", "open", 0)]


# --- the log's bounds -----------------------------------------------------------------------------------


def test_output_cap_applies_from_the_first_event_with_one_notice() -> None:
    task = make_task(output_bytes=100, delta_bytes=30)
    for _ in range(10):
        task.emit(EventType.TEXT_DELTA, delta="0123456789" * 3)
    deltas = [e.data["delta"] for e in task.log.events() if e.type is EventType.TEXT_DELTA]
    assert "".join(deltas) == ("0123456789" * 3 * 4)[:100] and all(len(d) <= 30 for d in deltas)
    assert task.text == ("0123456789" * 10) and task.log.output.size == 100
    task.finish(TaskStatus.COMPLETED)
    events = task.log.events()
    assert [e.type for e in events[-3:]] == [EventType.TEXT, EventType.LOGS, EventType.TASK_FINISH]
    assert events[-3].data["text"] == task.text
    notices = [e.data for e in events if e.type is EventType.LOGS]
    assert notices == [
        {
            "stream": "gpud",
            "line": "gpud cut this task's output: text output over the 100 bytes limit: 200 bytes cut",
            "task_id": task.id,
        }
    ]


def test_long_delta_is_split_losslessly() -> None:
    log = TaskEventLog("t", delta_bytes=64)
    log.append(EventType.TEXT_DELTA, {"delta": "é" * 100})
    deltas = [e.data["delta"] for e in log.events()]
    assert "".join(deltas) == "é" * 100 and [len(d) for d in deltas] == [32, 32, 32, 4]


def test_log_lines_are_shortened_and_the_log_budget_drops_the_rest() -> None:
    log = TaskEventLog("t", log_line_bytes=10, logs_bytes=300)
    for _ in range(20):
        log.append(EventType.LOGS, {"stream": "stderr", "line": "y" * 1000})
    kept = [e.data["line"] for e in log.events()]
    assert kept and all(line == "y" * 10 + "… [990 more bytes cut by gpud]" for line in kept)
    assert stored_bytes(log) <= 300 and log.logs_cut == 20 - len(kept)
    log.finish({"status": "completed"})
    notice = log.events()[-2].data["line"]
    assert f"{20 - len(kept)} log/progress events over the 300 bytes log limit dropped" in notice
    assert f"{len(kept)} log lines longer than 10 bytes shortened ({len(kept) * 990} bytes cut)" in notice


def test_progress_shares_the_log_budget() -> None:
    log = TaskEventLog("t", logs_bytes=200)
    for i in range(100):
        log.append(EventType.PROGRESS, {"done": i, "total": 100})
    assert stored_bytes(log) <= 200 and log.logs_cut > 90


def test_control_events_are_always_kept() -> None:
    log = TaskEventLog("t", max_events=2, logs_bytes=10, output_bytes=1)
    for _ in range(50):
        log.append(EventType.WORKER, {"status": "working"})
    assert log.last_id == 50


# --- encoding never raises ------------------------------------------------------------------------------


def test_event_data_is_made_encodable_when_the_event_is_created() -> None:
    log = TaskEventLog("t")
    event = log.append(
        EventType.WORKER,
        {"n": math.nan, "inf": -math.inf, "s": "a\ud800b", "\udc00k": 1, "deep": [[[1]]], "obj": object},
    )
    assert event is not None
    data = json.loads(event.json_bytes)  # strict UTF-8 JSON, no NaN token
    assert data["n"] is None and data["inf"] is None and data["s"] == "a\ufffdb" and data["\ufffdk"] == 1
    assert data["obj"] == "<class 'object'>"
    text = log.append(EventType.TEXT_DELTA, {"delta": "x\udfffy"})
    assert text is not None and text.data["delta"] == "x\ufffdy"


def test_finish_always_ends_the_stream_even_with_hostile_data() -> None:
    task = make_task()
    task.emit(EventType.TEXT_DELTA, delta="\ud800")
    task.set_text("lone \udc00")
    assert task.finish(TaskStatus.FAILED, error=TaskError("code\n", "message \ud800"), exit_code=1)
    assert task.log.finished
    end = task.log.events()[-1]
    assert end.type is EventType.TASK_FINISH and end.data["error"]["message"] == "message \ufffd"
    assert task.text == "lone \ufffd"
    assert json.dumps(task.report(with_result=True), allow_nan=False).encode()


def test_a_failing_finish_observer_does_not_keep_the_stream_open() -> None:
    task = make_task()

    def observer(_: Task) -> None:
        raise RuntimeError("observer broke")

    task.on_finish = observer
    assert task.finish(TaskStatus.COMPLETED) and task.log.finished


def test_strict_parsing_refuses_what_json_forbids() -> None:
    for raw in [b"NaN", b"[Infinity]", b"[-Infinity]", b"[1e400]", b'"\\ud800"', b'{"\\udc00": 1}', b'"\xed\xa0\x80"']:
        with pytest.raises(UnsafeJSON):
            loads_strict(raw)
    for raw in [b"[" * 100_000, b"1" * 5000, b"\xff", b"[" * 65 + b"]" * 65]:
        with pytest.raises(UnsafeJSON):
            loads_strict(raw)
    assert loads_strict(b"[" * 64 + b"]" * 64) is not None
    assert loads_strict(b'{"a": "\\ud800\\ud83d\\ude00"}', clean_strings=True) == {"a": "\ufffd😀"}


def test_dumps_safe_never_raises() -> None:
    nested: list[object] = []
    inner = nested
    for _ in range(2000):
        inner.append([])
        inner = inner[0]  # type: ignore[assignment]
    for value in [math.nan, "\ud800", 10**5000, nested, {1: b"bytes"}]:
        json.loads(dumps_safe(value))
    assert sanitize([math.inf, "\udfff"]) == [None, "\ufffd"]


# --- retention ------------------------------------------------------------------------------------------


def test_released_log_keeps_only_task_finish_and_replays_cleanly() -> None:
    task = make_task()
    for _ in range(10):
        task.emit(EventType.TEXT_DELTA, delta="d" * 1000)
    task.finish(TaskStatus.COMPLETED)
    last = task.log.last_id
    freed = task.release()
    assert freed > 20_000 and task.released and task.text == ""
    assert [e.id for e in task.log.events()] == [last] and [e.id for e in task.log.events(3)] == [last]
    assert task.log.retained_bytes < 400 and task.report()["released"] is True  # task_finish, its timings included


def test_registry_releases_the_oldest_finished_tasks_past_its_byte_budget() -> None:
    registry = TaskRegistry(lambda: 600.0, retention_bytes=lambda: 50_000)
    tasks = [make_task() for _ in range(5)]
    for task in tasks:
        registry.add(task)
        task.emit(EventType.TEXT_DELTA, delta="d" * 10_000)  # with its text event: 20 kB
        task.finish(TaskStatus.COMPLETED)  # the registry trims at once
    assert [t.released for t in tasks] == [True, True, True, False, False]
    assert registry.retained_bytes() <= 50_000 + 1000
    running = make_task()
    registry.add(running)
    running.emit(EventType.TEXT_DELTA, delta="r" * 100_000)
    registry.purge()
    assert not running.released, "only finished tasks are released"
