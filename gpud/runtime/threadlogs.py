"""Read a blocking multiplexed log stream (requests) in a pool thread and hand lines to an async iterator."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any

from gpud.runtime.base import LogLine, Stream
from gpud.runtime.logsplit import FRAME_HEADER, LineSplitter, parse_header

_QUEUE_LINES = 1024  # backpressure: the reader thread waits when the consumer is this far behind
_DONE = object()


def _read_exact(raw: Any, size: int) -> bytes:
    """Exactly `size` bytes, or fewer only at end of stream."""
    chunks: list[bytes] = []
    while size > 0:
        chunk = raw.read(size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _frames(resp: Any, stop: threading.Event) -> Iterator[tuple[Stream, bytes]]:
    """(stream, payload) per frame of the 8-byte-header format until the stream ends or stop is set."""
    while not stop.is_set():
        header = _read_exact(resp.raw, FRAME_HEADER)
        if len(header) < FRAME_HEADER:
            break
        stream, length = parse_header(header)
        yield stream, _read_exact(resp.raw, length)


async def stream_in_thread(
    pool: Executor, open_stream: Callable[[], Any], more: Callable[[threading.Event], Any] | None = None
) -> AsyncGenerator[LogLine, None]:
    """Run open_stream and the frame reader in `pool`; closing this iterator closes the HTTP response.

    `more`, when given, is called (in the pool, with the stop event) each time a stream ends; it returns the next
    response, which repeats the output from the start (what was read already is skipped, per stream, by its
    bytes), or None when the output is complete. One line splitter runs across them, so a line cut by the end of
    one stream goes on in the next."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=_QUEUE_LINES)
    stop = threading.Event()
    holder: list[Any] = []  # the open HTTP responses (requests-like: .raw, .close())

    def put(item: object) -> None:
        # Wait for room, but give up when the consumer has gone away (stop set) or the loop is closed.
        while not stop.is_set():
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            try:
                future.result(timeout=0.5)
                return
            except concurrent.futures.TimeoutError:
                future.cancel()

    def produce() -> None:
        try:
            splitter = LineSplitter()
            seen = {Stream.STDOUT: 0, Stream.STDERR: 0}  # bytes read so far per stream, over every response
            resp = open_stream()
            while resp is not None:
                holder.append(resp)
                skip = dict(seen)
                for stream, chunk in _frames(resp, stop):
                    if skip[stream] > 0:  # read before: the engine may frame it differently this time
                        cut = min(skip[stream], len(chunk))
                        skip[stream] -= cut
                        chunk = chunk[cut:]
                    seen[stream] += len(chunk)
                    for line in splitter.feed(stream, chunk):
                        put(line)
                resp.close()
                resp = more(stop) if more is not None and not stop.is_set() else None
            for line in splitter.flush():
                put(line)
        except BaseException as exc:
            if not stop.is_set():
                put(exc)
        finally:
            put(_DONE)

    worker = loop.run_in_executor(pool, produce)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, LogLine)
            yield item
    finally:
        stop.set()
        if holder:
            # Closing the response unblocks a read that waits for output of a still-running container.
            await loop.run_in_executor(None, holder[-1].close)
        worker.cancel()
