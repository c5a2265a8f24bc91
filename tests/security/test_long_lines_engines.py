"""A line far longer than the runtimes' line limit, printed by a one-off on the process runtime and through the real
Podman and Docker log streams: it comes back whole, as text_delta events of at most 64 KiB (finding 3: a line is
never held whole, and splitting it loses nothing)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.figures import Figures
from tests.integration.stack import Stack, runtimes, stack_fixture


@pytest.fixture(params=runtimes())
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async for opened in stack_fixture(request.param):
        yield opened


async def test_a_long_stdout_line_arrives_whole_in_bounded_deltas(stack: Stack, figures: Figures) -> None:
    word = "w" * 150_000 + "é" * 10_000  # 170 kB, with two-byte characters across the cut points
    events = await stack.run(stack.body("oneoff", metadata={"prompt": word, "max_tokens": 1}))
    assert events[-1].event == "task_finish" and events[-1].data["status"] == "completed"
    deltas = [e.data["delta"] for e in events if e.event == "text_delta"]
    figures.record(f"one 170 kB stdout line ({stack.runtime_name})", "text_delta events", len(deltas))
    assert "".join(deltas) == word + "\n"
    assert len(deltas) >= 3 and all(len(d.encode()) <= 64 * 1024 for d in deltas)
    (text,) = [e.data["text"] for e in events if e.event == "text"]
    assert text == word + "\n"
