"""HTTP client for the file service: one streaming download with size/sha256 checks, retries and backoff."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import enum
import errno
import hashlib
import logging
import os
import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)

DOWNLOAD_PATH = "/api/models/download"
SHA256_HEADER = "X-Content-SHA256"
DEFAULT_FILENAME = "model.bin"
CHUNK_SIZE = 4 << 20  # bytes handed to the writer thread at once
SYNC_FILE_RANGE_WRITE = 2
WRITE_QUEUE_DEPTH = 4  # batches received ahead of the disk (4 x 4 MiB)
TAR_TYPES = frozenset({"application/x-tar", "application/tar"})
COMPRESSED_TAR_TYPES = frozenset(
    {
        "application/gzip",
        "application/x-gzip",
        "application/x-gtar",
        "application/tar+gzip",
        "application/x-tar+gzip",
        "application/x-compressed-tar",
    }
)
_SAFE_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")

ByteProgress = Callable[[int, "int | None"], None]


class PayloadKind(enum.Enum):
    """How the body is to be stored."""

    FILE = "file"  # stored as one file named by Content-Disposition
    TAR = "tar"  # a tar archive of the model directory (possibly gzip-compressed)


@dataclass(frozen=True)
class Download:
    """A payload fully received into a local file, sized and hashed."""

    url: str
    kind: PayloadKind
    content_type: str
    filename: str
    size: int
    sha256: str
    sha256_checked: bool


class FetchError(Exception):
    """A download failed; `cause` is for people, `retryable` says whether another attempt may help."""

    def __init__(self, cause: str, *, retryable: bool) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retryable = retryable


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
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


class _Pipeline:
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


def payload_kind(content_type: str) -> PayloadKind:
    """Tar (optionally compressed) by Content-Type; everything else is a single file."""
    if content_type in TAR_TYPES or content_type in COMPRESSED_TAR_TYPES:
        return PayloadKind.TAR
    return PayloadKind.FILE


def _filename(resp: aiohttp.ClientResponse) -> str:
    """The single file's name from Content-Disposition, if it is a plain safe name; else DEFAULT_FILENAME."""
    cd = resp.content_disposition
    name = os.path.basename(cd.filename) if cd is not None and cd.filename else ""
    if name and _SAFE_FILENAME.fullmatch(name):
        return name
    if name:
        logger.warning("file service sent unsafe filename %r; storing as %s", name, DEFAULT_FILENAME)
    return DEFAULT_FILENAME


class FileServiceClient:
    """Fetches model payloads from `POST {base_url}/api/models/download` (see docs/model-store.md)."""

    def __init__(
        self,
        base_url: str | None,
        key: str | None,
        *,
        key_header: str,
        timeout: float,
        retries: int,
        backoff: float,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self._url = ""
        self._headers: dict[str, str] = {}
        self.retarget(base_url, key, key_header)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        self._retries = retries
        self._backoff = backoff
        self._chunk = chunk_size
        self._depth = WRITE_QUEUE_DEPTH
        self._session: aiohttp.ClientSession | None = None
        self._start_writeback = _load_sync_file_range()

    @property
    def configured(self) -> bool:
        """Whether a file service URL is set."""
        return bool(self._url)

    def retarget(self, base_url: str | None, key: str | None, key_header: str) -> None:
        """Use another file service or key from the next request on (reload); a request under way keeps its own."""
        self._url = base_url.rstrip("/") + DOWNLOAD_PATH if base_url else ""
        self._headers = {"Accept-Encoding": "identity"}
        if key:
            self._headers[key_header] = key

    async def open(self) -> None:
        """Open the HTTP session (large read buffer: fewer wakeups per GiB)."""
        self._session = aiohttp.ClientSession(timeout=self._timeout, auto_decompress=False, read_bufsize=self._chunk)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def download(self, model_id: str, dest: Path, progress: ByteProgress, max_bytes: int | None) -> Download:
        """Download into dest, retrying transient failures (5xx, 429, connection, timeout, truncation)."""
        attempt = 0
        while True:
            try:
                return await self._attempt(model_id, dest, progress, max_bytes)
            except FetchError as exc:
                if not exc.retryable or attempt >= self._retries:
                    if exc.retryable and attempt:
                        exc.cause = f"{exc.cause} (after {attempt + 1} attempts)"
                    raise
                delay = self._backoff * (2**attempt) * (0.5 + random.random())
                attempt += 1
                logger.warning(
                    "fetch of %s failed (%s); retry %d/%d in %.2fs",
                    model_id, exc.cause, attempt, self._retries, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)

    async def _attempt(self, model_id: str, dest: Path, progress: ByteProgress, max_bytes: int | None) -> Download:
        """One request; every failure is turned into a FetchError that says why."""
        if self._session is None:
            await self.open()
        assert self._session is not None
        try:
            async with self._session.post(self._url, json={"model_id": model_id}, headers=self._headers) as resp:
                await self._check_status(resp)
                return await self._receive(resp, dest, progress, max_bytes)
        except aiohttp.ClientPayloadError as exc:
            raise FetchError(f"download truncated: {exc}", retryable=True) from exc
        except TimeoutError as exc:  # before ClientConnectionError: aiohttp's timeouts are both
            raise FetchError(f"file service timed out: {exc or 'no data'}", retryable=True) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientOSError) as exc:
            raise FetchError(f"cannot reach file service: {exc}", retryable=True) from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise FetchError("disk full while storing the model", retryable=False) from exc
            raise FetchError(f"cannot write model file: {exc}", retryable=False) from exc

    @staticmethod
    async def _check_status(resp: aiohttp.ClientResponse) -> None:
        """5xx and 429 are transient; other non-200 statuses are final."""
        if resp.status == 200:
            return
        body = (await resp.content.read(300)).decode(errors="replace").strip()
        cause = f"file service answered {resp.status} {resp.reason or ''}".rstrip()
        if body:
            cause += f": {body}"
        raise FetchError(cause, retryable=resp.status >= 500 or resp.status == 429)

    async def _receive(
        self, resp: aiohttp.ClientResponse, dest: Path, progress: ByteProgress, max_bytes: int | None
    ) -> Download:
        """Stream the body to dest, hashing as it goes; check size and sha256."""
        total = resp.content_length
        if max_bytes is not None and total is not None and total > max_bytes:
            raise FetchError(f"model is {total} bytes, over the limit of {max_bytes}", retryable=False)
        pipe = _Pipeline(self._depth)
        done = 0
        try:
            await pipe.open(dest, self._start_writeback)
            progress(0, total)
            batch: list[bytes] = []
            batched = 0
            # Chunks as they come off the socket (no joining copy), handed to the threads in batches.
            async for chunk, _ in resp.content.iter_chunks():
                batch.append(chunk)
                batched += len(chunk)
                done += len(chunk)
                if max_bytes is not None and done > max_bytes:
                    raise FetchError(f"model is over the limit of {max_bytes} bytes", retryable=False)
                if batched >= self._chunk:
                    await pipe.submit(batch)
                    batch, batched = [], 0
                    progress(done, total)
            await pipe.submit(batch)
            await pipe.drain()
            progress(done, total)
            if total is not None and done != total:
                raise FetchError(f"download truncated: received {done} of {total} bytes", retryable=True)
            await pipe.finish()
        finally:
            await pipe.close()
        return self._result(resp, done, pipe.sink.digest.hexdigest())

    def _result(self, resp: aiohttp.ClientResponse, size: int, sha: str) -> Download:
        """Compare the sha256 header (if sent) and describe the payload."""
        expected = resp.headers.get(SHA256_HEADER, "").strip().lower()
        if expected and expected != sha:
            raise FetchError(f"sha256 mismatch: file service announced {expected}, received {sha}", retryable=False)
        content_type = resp.content_type
        return Download(
            url=self._url,
            kind=payload_kind(content_type),
            content_type=content_type,
            filename=_filename(resp),
            size=size,
            sha256=sha,
            sha256_checked=bool(expected),
        )
