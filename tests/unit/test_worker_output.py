"""A session worker's output ring (what `gpuctl logs` reads): order, bounds, cut lines, waiting, closing."""

from __future__ import annotations

import asyncio

from gpud.work.sessions.output import LINE_CHARS, WorkerOutput


def test_lines_keep_their_order_and_positions() -> None:
    out = WorkerOutput()
    out.add("stderr", "container line")
    out.add("stderr", "log line", task_id="t1")
    out.add("stdout", "half", partial=True)
    assert [(ln.seq, ln.stream, ln.line, ln.partial, ln.task_id) for ln in out.since(0)] == [
        (0, "stderr", "container line", False, None),
        (1, "stderr", "log line", False, "t1"),
        (2, "stdout", "half", True, None),
    ]
    assert [ln.line for ln in out.since(2)] == ["half"] and out.since(3) == []
    assert [ln.line for ln in out.last(2)] == ["log line", "half"] and out.last(0) == []
    assert out.next_seq == 3 and out.first_seq == 0


def test_the_oldest_lines_go_past_the_line_and_character_limits() -> None:
    by_lines = WorkerOutput(keep_lines=3, keep_chars=1 << 20)
    for i in range(10):
        by_lines.add("stdout", f"line {i}")
    assert [ln.line for ln in by_lines.since(0)] == ["line 7", "line 8", "line 9"]
    assert by_lines.first_seq == 7 and by_lines.since(8)[0].seq == 8
    by_chars = WorkerOutput(keep_lines=1000, keep_chars=25)
    for i in range(10):
        by_chars.add("stdout", f"{i}" * 10)
    assert [ln.line for ln in by_chars.since(0)] == ["8" * 10, "9" * 10]
    one = WorkerOutput(keep_lines=10, keep_chars=5)
    one.add("stdout", "x" * 100)
    assert len(one.since(0)) == 1  # the newest line is always kept, whatever its size


def test_a_long_protocol_line_is_cut_with_a_marker() -> None:
    out = WorkerOutput()
    out.add("worker", "y" * (LINE_CHARS + 7))
    (line,) = out.since(0)
    assert line.line == "y" * LINE_CHARS + "… [7 more characters cut]"


async def test_waiters_wake_on_a_new_line_and_on_close() -> None:
    out = WorkerOutput()
    waiter = asyncio.ensure_future(out.wait(0, timeout=10))
    await asyncio.sleep(0)
    assert not waiter.done()
    out.add("stdout", "hello")
    await asyncio.wait_for(waiter, 1)
    await asyncio.wait_for(out.wait(0, timeout=10), 1)  # already there: returns at once
    later = asyncio.ensure_future(out.wait(1, timeout=10))
    await asyncio.sleep(0)
    out.close()
    await asyncio.wait_for(later, 1)
    assert out.closed
    await asyncio.wait_for(out.wait(5, timeout=10), 1)  # closed: nothing to wait for


async def test_a_wait_with_nothing_new_times_out() -> None:
    out = WorkerOutput()
    await asyncio.wait_for(out.wait(0, timeout=0.05), 1)
    assert out.since(0) == []
