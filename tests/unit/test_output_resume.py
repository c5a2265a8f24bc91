"""Reading a container's output across interruptions: the CRI log file format Podman's output is read from, a
file followed while it grows until the exit, and the skipping of what was delivered before when the output is
read again from the start after an engine outage (long lines in pieces included)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gpud.runtime.base import LogLine, Stream
from gpud.runtime.crilog import follow_log_file, parse_entries
from gpud.runtime.process import ProcessRuntime
from gpud.work.outage import OutputFollower

OUT, ERR = Stream.STDOUT, Stream.STDERR
TS = b"2026-01-01T00:00:00.000000001+00:00"


def entry(stream: bytes, flag: bytes, content: bytes) -> bytes:
    return TS + b" " + stream + b" " + flag + b" " + content + b"\n"


def following(path: Path) -> tuple[asyncio.Future[None], list[LogLine], asyncio.Task[None]]:
    """follow_log_file on `path` in a task: the future that ends it (the container's exit), the lines so far, and
    the task."""
    exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait_exit() -> None:
        await exited

    lines: list[LogLine] = []

    async def follow() -> None:
        async for line in follow_log_file(str(path), True, wait_exit):
            lines.append(line)

    return exited, lines, asyncio.create_task(follow())


def test_entries_keep_bytes_and_newlines_and_wait_for_a_whole_entry() -> None:
    data = (
        entry(b"stdout", b"P", b"a b  c ")  # spaces inside the content are content
        + entry(b"stdout", b"F", b"end")
        + entry(b"stderr", b"F", b"")  # an empty line
        + entry(b"bogus", b"F", b"x")  # not an entry conmon writes: skipped, not passed on
        + entry(b"stderr", b"P", b"\xc3")  # half a character: bytes, decoded later by the line splitter
        + TS
        + b" stdout F unfinish"  # still being written
    )
    entries, used = parse_entries(data)
    assert entries == [(OUT, b"a b  c "), (OUT, b"end\n"), (ERR, b"\n"), (ERR, b"\xc3")]
    assert data[used:] == TS + b" stdout F unfinish"


async def test_a_growing_file_is_followed_until_the_exit_and_read_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    path.write_bytes(entry(b"stdout", b"F", b"one"))
    exited, lines, reader = following(path)
    await asyncio.sleep(0.1)
    assert [line.line for line in lines] == ["one"] and not reader.done()
    with path.open("ab") as log:
        log.write(entry(b"stdout", b"P", b"tw"))
        log.flush()
        await asyncio.sleep(0.1)
        log.write(entry(b"stdout", b"F", b"o") + entry(b"stderr", b"P", b"last, no newline"))
    exited.set_result(None)  # the file was complete before the exit was known
    await asyncio.wait_for(reader, 5)
    assert lines == [LogLine(OUT, "one"), LogLine(OUT, "two"), LogLine(ERR, "last, no newline")]


async def test_a_rotated_file_is_read_on_in_its_new_file(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    path.write_bytes(entry(b"stdout", b"F", b"old"))
    exited, lines, reader = following(path)
    await asyncio.sleep(0.1)
    (tmp_path / "ctr.log.tmp").write_bytes(entry(b"stdout", b"F", b"new"))
    (tmp_path / "ctr.log.tmp").rename(path)  # as conmon rotates a log that reached its size limit
    await asyncio.sleep(0.3)
    exited.set_result(None)
    await asyncio.wait_for(reader, 5)
    assert [line.line for line in lines] == ["old", "new"]


def test_a_second_read_from_the_start_gives_only_what_was_not_delivered() -> None:
    follower = OutputFollower(ProcessRuntime(unshare=(None, "test")), "c", "test")
    first = [LogLine(OUT, "a"), LogLine(ERR, "e1"), LogLine(OUT, "bb", partial=True), LogLine(OUT, "bb", partial=True)]
    read: dict[Stream, tuple[int, int]] = {OUT: (0, 0), ERR: (0, 0)}
    assert [follower._admit(line, read) for line in first] == first
    # The engine went away in the middle of the long line; the output is read again from the start.
    again = [
        LogLine(OUT, "a"),
        LogLine(OUT, "bb", partial=True),
        LogLine(ERR, "e1"),
        LogLine(OUT, "bb", partial=True),
        LogLine(OUT, "b!"),  # the rest of the long line
        LogLine(ERR, "e2"),
        LogLine(OUT, "c"),
    ]
    read = {OUT: (0, 0), ERR: (0, 0)}
    new = [admitted for line in again if (admitted := follower._admit(line, read)) is not None]
    assert new == [LogLine(OUT, "b!"), LogLine(ERR, "e2"), LogLine(OUT, "c")]


def test_a_piece_cut_elsewhere_the_second_time_gives_only_its_rest() -> None:
    follower = OutputFollower(ProcessRuntime(unshare=(None, "test")), "c", "test")
    read: dict[Stream, tuple[int, int]] = {OUT: (0, 0), ERR: (0, 0)}
    assert follower._admit(LogLine(OUT, "abc", partial=True), read) == LogLine(OUT, "abc", partial=True)
    read = {OUT: (0, 0), ERR: (0, 0)}
    assert follower._admit(LogLine(OUT, "abcdef"), read) == LogLine(OUT, "def")
