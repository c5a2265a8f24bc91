"""Read a blocking multiplexed log stream (requests) in a pool thread and hand lines to an async iterator."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

from gpud.runtime.base import LogLine
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


def _frames(resp: Any, stop: threading.Event) -> Any:
    """Yield LogLines from the 8-byte-header frame format until the stream ends or stop is set."""
    splitter = LineSplitter()
    while not stop.is_set():
        header = _read_exact(resp.raw, FRAME_HEADER)
        if len(header) < FRAME_HEADER:
            break
        stream, length = parse_header(header)
        yield from splitter.feed(stream, _read_exact(resp.raw, length))
    yield from splitter.flush()


async def stream_in_thread(pool: Executor, open_stream: Callable[[], Any]) -> AsyncIterator[LogLine]:
    """Run open_stream and the frame reader in `pool`; closing this iterator closes the HTTP response."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=_QUEUE_LINES)
    stop = threading.Event()
    holder: list[Any] = []  # the open HTTP response (requests-like: .raw, .close())

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
            resp = open_stream()
            holder.append(resp)
            for line in _frames(resp, stop):
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
            await loop.run_in_executor(None, holder[0].close)
        worker.cancel()
