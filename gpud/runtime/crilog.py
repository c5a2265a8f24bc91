"""A container's output read straight from its log file in the CRI format (Podman's `k8s-file` driver), as the
kubelet reads CRI-O's: `<timestamp> <stdout|stderr> <P|F> <bytes>` per entry, where F ends a line and P does not.

Why not libpod's log API: with `follow`, libpod 4.3 tails the file by polling and, under a burst, skips and
splices entries mid-stream (a one-off printing 20 MB and exiting got 1.5 MB right, then lines from much later,
then nothing), and ends the stream at the container's exit before the rest was sent. The file itself, which
conmon writes, is complete; reading it here is exact, and goes on while the engine's API does not answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import Executor
from typing import BinaryIO

from gpud.runtime.base import EngineUnavailable, LogLine, Stream
from gpud.runtime.logsplit import LineSplitter

logger = logging.getLogger(__name__)

_STREAMS = {b"stdout": Stream.STDOUT, b"stderr": Stream.STDERR}
_READ_BYTES = 1 << 20  # read at most this much per call (in a pool thread)
_POLL_FIRST = 0.02  # seconds between looks at a file that did not grow, doubling ...
_POLL_MOST = 0.25  # ... up to this
_WAIT_RETRY = 0.5  # seconds before asking again for the exit after the engine did not answer


def parse_entries(data: bytes) -> tuple[list[tuple[Stream, bytes]], int]:
    """The (stream, bytes) of each complete entry at the front of `data` (an F entry's bytes end with its
    newline), and how many bytes of `data` they took; an entry still being written is left for later."""
    entries: list[tuple[Stream, bytes]] = []
    start = 0
    while (end := data.find(b"\n", start)) >= 0:
        parts = data[start:end].split(b" ", 3)
        start = end + 1
        if len(parts) < 3 or parts[1] not in _STREAMS:
            continue  # not an entry (conmon writes none such): skipped rather than passed on as output
        content = parts[3] if len(parts) == 4 else b""
        entries.append((_STREAMS[parts[1]], content + b"\n" if parts[2] == b"F" else content))
    return entries, start


def _read_more(file: BinaryIO, path: str) -> tuple[bytes, BinaryIO]:
    """The next bytes, and the file to read on from: at the end of a file that conmon has rotated (a new file
    renamed over the path, when the log has a size limit), the new file's."""
    chunk = file.read(_READ_BYTES)
    if chunk:
        return chunk, file
    try:
        rotated = os.stat(path).st_ino != os.fstat(file.fileno()).st_ino
    except OSError:  # removed with its container: nothing more will come
        return b"", file
    if not rotated:
        return b"", file
    file.close()
    file = open(path, "rb")  # noqa: SIM115 (returned; the caller closes it)
    return file.read(_READ_BYTES), file


async def follow_log_file(
    path: str, follow: bool, wait_exit: Callable[[], Awaitable[object]], pool: Executor | None = None
) -> AsyncGenerator[LogLine, None]:
    """Every output line in the file, in order per stream; with follow, until the container has exited (learned
    from `wait_exit`, asked again while the engine does not answer) and the file is read to its end. File reads
    run in `pool`."""
    loop = asyncio.get_running_loop()
    file: BinaryIO = await loop.run_in_executor(pool, open, path, "rb")
    splitter = LineSplitter()
    exited: asyncio.Future[None] | None = None
    try:
        pending = b""
        pause = _POLL_FIRST
        while True:
            # An empty read that began after the exit was known is the end: conmon wrote all before the exit.
            exit_known = exited is not None and exited.done()
            chunk, file = await loop.run_in_executor(pool, _read_more, file, path)
            if chunk:
                entries, used = parse_entries(pending + chunk)
                pending = (pending + chunk)[used:]
                for stream, content in entries:
                    for line in splitter.feed(stream, content):
                        yield line
                pause = _POLL_FIRST
                continue
            if not follow or exit_known:
                break
            if exited is None:
                exited = asyncio.ensure_future(_exit_of(wait_exit))
            await asyncio.wait({exited}, timeout=pause)
            pause = min(pause * 2, _POLL_MOST)
        for line in splitter.flush():
            yield line
    finally:
        if exited is not None:
            exited.cancel()
        await loop.run_in_executor(pool, file.close)


async def _exit_of(wait_exit: Callable[[], Awaitable[object]]) -> None:
    """Returns once the container has exited (or is gone); while the engine does not answer, asks again (the
    file is read meanwhile)."""
    while True:
        try:
            await wait_exit()
            return
        except EngineUnavailable:
            await asyncio.sleep(_WAIT_RETRY)
        except Exception:  # gone, or its wait failed: nothing more will be written that can be waited for
            return
