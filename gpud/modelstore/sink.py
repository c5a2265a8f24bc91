"""The writing end of a model download: batches of received chunks written (writev) and hashed in two threads,
in order, with writeback started as it goes, so the disk and the hash keep pace with the network."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SYNC_FILE_RANGE_WRITE = 2
WRITE_QUEUE_DEPTH = 4  # batches received ahead of the disk (4 x 4 MiB)


def load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """libc sync_file_range (Linux), to start writeback while downloading; None where unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, length: int) -> None:
        fn(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # a hint: failure only costs speed

    return start_writeback


class _Sink:
    """Writes and hashes batches of chunks, off the event loop: write() in one thread, hash() in another."""

    def __init__(self, path: Path, start_writeback: Callable[[int, int, int], None] | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.digest = hashlib.sha256()
        self.offset = 0
        self._start_writeback = start_writeback

    def hash(self, parts: list[bytes]) -> None:
        """Feed parts to the sha256 (hashlib releases the GIL, so this runs beside the write)."""
        for part in parts:
            self.digest.update(part)

    def write(self, parts: list[bytes]) -> None:
        """Append parts (writev: no joining copy) and start their writeback."""
        start = self.offset
        end = start + sum(len(p) for p in parts)
        while parts:
            written = os.writev(self.fd, parts)
            self.offset += written
            parts = _drop_prefix(parts, written)
        if self._start_writeback is not None:
            # Start writing this batch to disk now, so the fsync at the end has little left to do
            # and disk writes overlap the network instead of following it.
            self._start_writeback(self.fd, start, end - start)

    def finish(self) -> None:
        """Make the data durable."""
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the file."""
        os.close(self.fd)


def _drop_prefix(parts: list[bytes], n: int) -> list[bytes]:
    """What remains of parts after a short writev of n bytes."""
    rest: list[bytes] = []
    for part in parts:
        if n >= len(part):
            n -= len(part)
        else:
            rest.append(part[n:])
            n = 0
    return rest


class Pipeline:
    """One writer and one hasher thread per download: batches stay in order, hashing runs beside writing
    (sha256 costs about as much CPU as receiving), and up to `depth` batches may queue behind a write that
    waits on the disk, so receiving never stalls on writeback."""

    def __init__(self, depth: int) -> None:
        self._depth = depth
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-write")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-hash")
        self._queued: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._sink: _Sink | None = None

    @property
    def sink(self) -> _Sink:
        assert self._sink is not None
        return self._sink

    async def open(self, dest: Path, start_writeback: Callable[[int, int, int], None] | None) -> None:
        loop = asyncio.get_running_loop()
        self._sink = await loop.run_in_executor(self._writer, _Sink, dest, start_writeback)

    async def submit(self, batch: list[bytes]) -> None:
        """Queue a batch (waiting only while `depth` batches are already queued)."""
        if not batch:
            return
        while len(self._queued) >= self._depth:
            await self._queued.popleft()
        loop = asyncio.get_running_loop()
        self._queued.append(
            asyncio.gather(
                loop.run_in_executor(self._writer, self.sink.write, batch),
                loop.run_in_executor(self._hasher, self.sink.hash, batch),
            )
        )

    async def drain(self) -> None:
        """Wait for every queued batch (raising the first error, e.g. ENOSPC)."""
        while self._queued:
            await self._queued.popleft()

    async def finish(self) -> None:
        """fsync the file."""
        await asyncio.get_running_loop().run_in_executor(self._writer, self.sink.finish)

    async def close(self) -> None:
        """Let queued work end, close the file, stop the threads."""
        if self._queued:
            await asyncio.wait(self._queued)
            for fut in self._queued:
                if not fut.cancelled():
                    fut.exception()  # retrieved: the error that matters was raised already
        if self._sink is not None:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._sink.close)
        self._writer.shutdown(wait=False)
        self._hasher.shutdown(wait=False)
