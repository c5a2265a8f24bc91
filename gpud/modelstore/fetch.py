"""HTTP client for the file service: one streaming download with size/sha256 checks, retries and backoff."""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gpud.modelstore.pace import FetchPace, RateGuard
from gpud.modelstore.sink import WRITE_QUEUE_DEPTH, Pipeline, load_sync_file_range

logger = logging.getLogger(__name__)

DOWNLOAD_PATH = "/api/models/download"
SHA256_HEADER = "X-Content-SHA256"
DEFAULT_FILENAME = "model.bin"
CHUNK_SIZE = 4 << 20  # bytes handed to the writer thread at once
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

    def __init__(self, cause: str, *, retryable: bool, over_limit: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retryable = retryable
        self.over_limit = over_limit  # refused by max_bytes (the caller knows which setting that was)


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
        self._start_writeback = load_sync_file_range()

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

    async def download(
        self, model_id: str, dest: Path, progress: ByteProgress, max_bytes: int | None, pace: FetchPace | None = None
    ) -> Download:
        """Download into dest, retrying transient failures (5xx, 429, connection, timeout, truncation, a body
        slower than pace.min_rate), all within pace.deadline."""
        pace = pace or FetchPace()
        try:
            async with asyncio.timeout(pace.deadline):
                return await self._download(model_id, dest, progress, max_bytes, pace)
        except TimeoutError as exc:
            cause = f"the download took longer than {pace.deadline:g}s (GPUD_MODEL_FETCH_DEADLINE)"
            raise FetchError(cause, retryable=False) from exc

    async def _download(
        self, model_id: str, dest: Path, progress: ByteProgress, max_bytes: int | None, pace: FetchPace
    ) -> Download:
        attempt = 0
        while True:
            try:
                return await self._attempt(model_id, dest, progress, max_bytes, pace)
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

    async def _attempt(
        self, model_id: str, dest: Path, progress: ByteProgress, max_bytes: int | None, pace: FetchPace
    ) -> Download:
        """One request; every failure is turned into a FetchError that says why."""
        if self._session is None:
            await self.open()
        assert self._session is not None
        try:
            async with self._session.post(self._url, json={"model_id": model_id}, headers=self._headers) as resp:
                await self._check_status(resp)
                return await self._receive(resp, dest, progress, max_bytes, pace)
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
        self, resp: aiohttp.ClientResponse, dest: Path, progress: ByteProgress, max_bytes: int | None, pace: FetchPace
    ) -> Download:
        """Stream the body to dest, hashing as it goes; check size, rate and sha256."""
        total = resp.content_length
        if max_bytes is not None and total is not None and total > max_bytes:
            raise FetchError(f"model is {total} bytes, over the limit of {max_bytes}", retryable=False, over_limit=True)
        pipe = Pipeline(self._depth)
        try:
            await pipe.open(dest, self._start_writeback)
            progress(0, total)
            done = await self._stream(resp, pipe, progress, max_bytes, pace)
            progress(done, total)
            if total is not None and done != total:
                raise FetchError(f"download truncated: received {done} of {total} bytes", retryable=True)
            await pipe.finish()
        finally:
            await pipe.close()
        return self._result(resp, done, pipe.sink.digest.hexdigest())

    async def _stream(
        self,
        resp: aiohttp.ClientResponse,
        pipe: Pipeline,
        progress: ByteProgress,
        max_bytes: int | None,
        pace: FetchPace,
    ) -> int:
        """Hand the body to the pipeline; returns its size. A body slower than the pace fails (retryable)."""
        total = resp.content_length
        loop = asyncio.get_running_loop()
        guard = RateGuard(pace.min_rate, pace.window, loop.time())
        batch: list[bytes] = []
        batched = done = 0
        try:
            async with asyncio.timeout_at(guard.fail_at()) as timer:
                # Chunks as they come off the socket (no joining copy), handed to the threads in batches.
                async for chunk, _ in resp.content.iter_chunks():
                    batch.append(chunk)
                    batched += len(chunk)
                    done += len(chunk)
                    if max_bytes is not None and done > max_bytes:
                        cause = f"model is over the limit of {max_bytes} bytes"
                        raise FetchError(cause, retryable=False, over_limit=True)
                    guard.record(loop.time(), done)
                    timer.reschedule(guard.fail_at())
                    if batched >= self._chunk:
                        await pipe.submit(batch)
                        batch, batched = [], 0
                        progress(done, total)
        except TimeoutError as exc:
            if timer.expired():
                raise FetchError(guard.describe(), retryable=True) from exc
            raise
        await pipe.submit(batch)
        await pipe.drain()
        return done

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
