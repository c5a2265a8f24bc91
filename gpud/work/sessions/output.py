"""What a session's worker wrote, for `gpuctl logs`: its container output and its protocol `log` lines in one
bounded ring, in the order gpud received them, which readers page through and follow.

Why one ring in gpud rather than the engine's container log: an SDK worker's `ctx.log` lines travel over the
worker protocol (they become the task's `logs` events), not through the container's output, so the engine never
sees them. Having the SDK also print them would make them container output, which the session already forwards
into the running task's events: every line would reach the client twice. gpud sees both channels as they arrive,
so it records them together, in arrival order, and bounds what it keeps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from dataclasses import dataclass

# What one worker's ring keeps: the newest lines, at most this many and this much text (characters).
KEEP_LINES = 10_000
KEEP_CHARS = 4 * 1024 * 1024
# A protocol log line longer than this is cut (container output already arrives in pieces of bounded size).
LINE_CHARS = 16 * 1024


@dataclass(frozen=True)
class OutputLine:
    """One line: its position in the worker's output (0 = first ever), the stream, the text; `partial` for each
    piece of an over-long line but its last; `task_id` for a protocol `log` line (the task that was running)."""

    seq: int
    stream: str
    line: str
    partial: bool = False
    task_id: str | None = None


class WorkerOutput:
    """A bounded, followable ring of one worker's output lines."""

    def __init__(self, keep_lines: int = KEEP_LINES, keep_chars: int = KEEP_CHARS) -> None:
        self._lines: collections.deque[OutputLine] = collections.deque()
        self._keep_lines = keep_lines
        self._keep_chars = keep_chars
        self._chars = 0
        self._next = 0
        self._news = asyncio.Event()
        self.closed = False

    @property
    def next_seq(self) -> int:
        """The position the next line will have."""
        return self._next

    @property
    def first_seq(self) -> int:
        """The position of the oldest line still kept (lines before it were dropped)."""
        return self._next - len(self._lines)

    def add(self, stream: str, line: str, *, partial: bool = False, task_id: str | None = None) -> None:
        """Record a line (a long one is cut); the oldest go once more than the limits are kept."""
        if len(line) > LINE_CHARS:
            line = line[:LINE_CHARS] + f"… [{len(line) - LINE_CHARS} more characters cut]"
        self._lines.append(OutputLine(self._next, stream, line, partial, task_id))
        self._next += 1
        self._chars += len(line)
        while len(self._lines) > 1 and (len(self._lines) > self._keep_lines or self._chars > self._keep_chars):
            self._chars -= len(self._lines.popleft().line)
        self._wake()

    def since(self, seq: int) -> list[OutputLine]:
        """The kept lines at position `seq` and after (from the oldest kept, if `seq` was dropped)."""
        return self.last(self._next - max(seq, self.first_seq))

    def last(self, count: int) -> list[OutputLine]:
        """The newest `count` lines kept (taken from the end: a follower asks often, for few lines)."""
        newest = list(itertools.islice(reversed(self._lines), max(0, count)))
        newest.reverse()
        return newest

    async def wait(self, seq: int, timeout: float) -> None:
        """Return when a line at position `seq` or later exists, the output is closed, or `timeout` passed."""
        if self._next > seq or self.closed:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._news.wait(), timeout)

    def close(self) -> None:
        """The worker is gone: nothing more will be added, and followers stop."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        # Waiters hold the old event: set it once, and give later waiters a fresh one.
        self._news.set()
        self._news = asyncio.Event()
