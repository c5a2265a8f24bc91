"""ModelStore: the bounded, shared model cache; fetches each missing model once, however many tasks wait."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gpud.errors import Conflict, ErrorKind, GpudError, NotFound, Unavailable
from gpud.metrics import Metrics
from gpud.modelstore import disk
from gpud.modelstore.archive import ArchiveLimits, FileEntry, UnsafeArchive, extract_tar
from gpud.modelstore.fetch import Download, FetchError, FileServiceClient, PayloadKind
from gpud.modelstore.flight import Flight, ProgressCallback, in_thread
from gpud.modelstore.ids import model_path
from gpud.modelstore.info import FetchPhase, ModelInfo, VerifyResult
from gpud.modelstore.manifest import MANIFEST_NAME, Manifest, SourceInfo, now, read_manifest, write_manifest
from gpud.modelstore.pace import FetchPace

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _fetch_failed(model_id: str, cause: str) -> GpudError:
    return GpudError(
        f"fetching model {model_id!r} failed: {cause}", code="model_fetch_failed", kind=ErrorKind.UNAVAILABLE
    )


class ModelStore:
    """Models on local disk under cache_dir, one directory each, fetched from the file service on demand."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        file_service_url: str | None,
        internal_key: str | None,
        auto_fetch: bool,
        max_bytes: int | None = None,
        key_header: str = "X-Internal-Key",
        request_timeout: float = 60.0,
        retries: int = 3,
        retry_backoff: float = 0.5,
        limits: ArchiveLimits | None = None,
        pace: FetchPace | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self.cache_dir = Path(cache_dir)
        self.auto_fetch = auto_fetch
        self.max_bytes = max_bytes
        self.limits = limits or ArchiveLimits()
        self.pace = pace or FetchPace()
        self._client = FileServiceClient(
            file_service_url,
            internal_key,
            key_header=key_header,
            timeout=request_timeout,
            retries=retries,
            backoff=retry_backoff,
        )
        self._flights: dict[str, Flight] = {}
        self._holders: dict[str, set[str]] = {}
        self._hand_sizes: dict[str, int] = {}  # sizes of manifest-less dirs, walked once

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def configure(
        self,
        *,
        file_service_url: str | None,
        internal_key: str | None,
        key_header: str,
        auto_fetch: bool,
        limits: ArchiveLimits | None = None,
        pace: FetchPace | None = None,
    ) -> None:
        """Apply reloaded fetch settings: the next fetch uses them; one already running finishes as it began."""
        self.auto_fetch = auto_fetch
        self._client.retarget(file_service_url, internal_key, key_header)
        self.limits = limits or self.limits
        self.pace = pace or self.pace

    async def start(self) -> None:
        """Create the cache dir and delete temporaries left by a crash (the HTTP session opens on first use).
        A leftover that cannot be deleted is logged and left: it must never keep gpud from starting."""
        await self._run(self.cache_dir.mkdir, 0o777, True, True)
        try:
            removed = await self._run(disk.clean_temporaries, self.cache_dir)
        except Exception:
            logger.exception("model cache: cleaning leftover temporaries failed; starting anyway")
            return
        if removed:
            logger.info("model cache: removed %d leftover temporaries: %s", len(removed), ", ".join(removed))

    async def close(self) -> None:
        """Cancel fetches in progress (their temporaries are removed) and close the HTTP session."""
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.close()

    def path_for(self, model_id: str) -> Path:
        """The model's directory (validated; raises InvalidRequest for any unsafe id)."""
        return model_path(self.cache_dir, model_id)

    def _present(self, path: Path) -> bool:
        return path.is_dir()

    def cached(self, model_id: str) -> bool:
        """Whether the model is in the cache now, complete (not being fetched): ensure() would not wait."""
        return model_id not in self._flights and self._present(self.path_for(model_id))

    def _touch(self, path: Path) -> None:
        """Record use: the model directory's mtime is its last-used time (works for hand-placed dirs too)."""
        try:
            os.utime(path)
        except OSError as exc:
            logger.warning("cannot record use of %s: %s", path, exc)

    async def ensure(
        self, model_id: str, progress: ProgressCallback | None = None, *, holder: str | None = None
    ) -> Path:
        """The model's path, fetching it first if absent and auto_fetch is on; with holder, acquire it too."""
        path = self.path_for(model_id)
        if model_id not in self._flights and self._present(path):
            self._touch(path)
        elif not self.auto_fetch and model_id not in self._flights:
            raise NotFound(
                f"model {model_id!r} is not in the cache and AUTO_FETCH_MODELS is off", code="model_not_cached"
            )
        else:
            await self._join_flight(model_id, progress)
        if holder is not None:
            # No await between the check above and here, so eviction cannot slip in between.
            self.acquire(model_id, holder)
        return path

    async def prefetch(self, model_id: str, progress: ProgressCallback | None = None) -> ModelInfo:
        """Fetch ahead of time (regardless of auto_fetch); a model already present is left as is."""
        path = self.path_for(model_id)
        if model_id in self._flights or not self._present(path):
            await self._join_flight(model_id, progress)
        return self.info(model_id)

    async def _join_flight(self, model_id: str, progress: ProgressCallback | None) -> None:
        """Start the model's fetch or join the one running; every joiner gets every progress update.
        A joiner that is cancelled leaves at once; the last to leave cancels the fetch."""
        flight = self._flights.get(model_id)
        if flight is None:
            if not self._client.configured:
                raise Unavailable(
                    f"model {model_id!r} is not cached and no FILE_SERVICE_URL is configured",
                    code="model_fetch_failed",
                )
            flight = Flight(model_id, on_abandon=self._forget)
            self._flights[model_id] = flight
            flight.task = asyncio.create_task(self._fetch(flight), name=f"fetch-model-{model_id}")
            # Mark the exception retrieved even when every waiter was cancelled.
            flight.task.add_done_callback(lambda t: t.cancelled() or t.exception())
            flight.task.add_done_callback(self._observe_fetch(time.monotonic()))
        await flight.wait(progress)

    def _observe_fetch(self, started: float) -> Callable[[asyncio.Task[None]], None]:
        """A done-callback for a fetch begun at `started` (monotonic): its duration, or a failure, in the metrics
        (a fetch cancelled because every waiter left is neither)."""

        def done(fetch: asyncio.Task[None]) -> None:
            if self._metrics is None or fetch.cancelled():
                return
            if fetch.exception() is None:
                self._metrics.model_fetch_duration.observe(time.monotonic() - started)
            else:
                self._metrics.model_fetch_failures.inc()

        return done

    def _forget(self, flight: Flight) -> None:
        if self._flights.get(flight.model_id) is flight:
            del self._flights[flight.model_id]

    async def _fetch(self, flight: Flight) -> None:
        """Download, unpack, record, evict to fit, publish atomically; temporaries always removed."""
        model_id = flight.model_id
        tmp = self.cache_dir / f"{disk.TMP_PREFIX}{model_id}-{secrets.token_hex(6)}"
        try:
            await self._run(os.mkdir, tmp, 0o700)
            flight.report(FetchPhase.CONNECTING, 0, None)
            await self._fetch_into(flight, tmp)
        except FetchError as exc:
            raise _fetch_failed(model_id, exc.cause) from exc
        except UnsafeArchive as exc:
            raise _fetch_failed(model_id, f"archive refused: {exc}") from exc
        except (tarfile.TarError, EOFError) as exc:
            raise _fetch_failed(model_id, f"archive is corrupt: {exc}") from exc
        except OSError as exc:
            cause = "disk full while storing the model" if exc.errno == errno.ENOSPC else str(exc)
            raise _fetch_failed(model_id, cause) from exc
        finally:
            await asyncio.shield(self._run(disk.remove_tree, tmp))
            self._forget(flight)

    async def _fetch_into(self, flight: Flight, tmp: Path) -> None:
        model_id = flight.model_id
        caps = [(self.max_bytes, "GPUD_MODEL_CACHE_MAX_BYTES"), (self.limits.max_bytes, "GPUD_MODEL_ARCHIVE_MAX_BYTES")]
        known = [(c, name) for c, name in caps if c is not None]
        cap, setting = min(known) if known else (None, "")

        def on_bytes(done: int, total: int | None) -> None:
            flight.report(FetchPhase.DOWNLOADING, done, total)

        payload = tmp / "payload"
        try:
            dl = await self._client.download(model_id, payload, on_bytes, cap, self.pace)
        except FetchError as exc:
            if exc.over_limit:
                exc.cause = f"{exc.cause} ({setting})"
            raise
        staged = tmp / "model"
        flight.report(FetchPhase.EXTRACTING, dl.size, dl.size)
        files = await in_thread(self._unpack, dl, payload, staged, flight.stop, stop=flight.stop)
        manifest = Manifest(
            model_id=model_id,
            fetched_at=now(),
            source=SourceInfo(dl.url, dl.content_type, dl.size, dl.sha256, dl.sha256_checked),
            files=files,
        )
        await in_thread(write_manifest, staged, manifest)
        await self._evict(manifest.total_bytes, keep=model_id)
        final = self.path_for(model_id)
        if not await in_thread(disk.publish, staged, final):
            logger.warning("model %s appeared in the cache during its fetch; keeping that copy", model_id)
        self._hand_sizes.pop(model_id, None)
        self._touch(final)
        if self._metrics is not None:
            self._metrics.model_fetch_bytes.inc(dl.size)
        flight.report(FetchPhase.DONE, dl.size, dl.size, force=True)
        logger.info("model %s fetched: %d bytes, %d files", model_id, dl.size, len(files))

    def _unpack(self, dl: Download, payload: Path, staged: Path, stop: threading.Event) -> list[FileEntry]:
        """Turn the payload into the staged model directory (runs in a worker thread)."""
        os.mkdir(staged, 0o755)
        if dl.kind is PayloadKind.FILE:
            os.rename(payload, staged / dl.filename)
            return [FileEntry(path=dl.filename, size=dl.size, sha256=dl.sha256)]
        caps = self.limits.caps_for(dl.size, self.max_bytes)
        entries = extract_tar(payload, staged, caps=caps, reserved=frozenset({MANIFEST_NAME}), stop=stop)
        os.unlink(payload)
        return entries

    # --- holders -------------------------------------------------------------------------------------

    def acquire(self, model_id: str, holder: str) -> None:
        """A running worker mounts the model: protect it from eviction and removal until release()."""
        path = self.path_for(model_id)
        if not self._present(path):
            raise NotFound(f"model {model_id!r} is not in the cache", code="model_not_cached")
        self._holders.setdefault(model_id, set()).add(holder)
        self._touch(path)

    def release(self, model_id: str, holder: str) -> None:
        """The worker is gone; releasing a holder that was never acquired is a no-op."""
        path = self.path_for(model_id)
        holders = self._holders.get(model_id)
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del self._holders[model_id]
        if self._present(path):
            self._touch(path)

    # --- listing -------------------------------------------------------------------------------------

    def _size(self, model_id: str, path: Path, manifest: Manifest | None) -> int:
        if manifest is not None:
            return manifest.total_bytes
        if model_id not in self._hand_sizes:
            self._hand_sizes[model_id] = disk.dir_size(path)
        return self._hand_sizes[model_id]

    def info(self, model_id: str) -> ModelInfo:
        """What the cache knows about one model; NotFound(model_not_cached) if neither present nor fetching."""
        path = self.path_for(model_id)
        flight = self._flights.get(model_id)
        holders = tuple(sorted(self._holders.get(model_id, ())))
        if not self._present(path):
            if flight is None:
                raise NotFound(f"model {model_id!r} is not in the cache", code="model_not_cached")
            return ModelInfo(model_id, str(path), False, None, None, holders, False, flight.last)
        manifest = read_manifest(path)
        return ModelInfo(
            model_id=model_id,
            path=str(path),
            complete=True,
            size_bytes=self._size(model_id, path, manifest),
            last_used=path.stat().st_mtime,
            holders=holders,
            has_manifest=manifest is not None,
            fetching=flight.last if flight else None,
        )

    def list(self) -> list[ModelInfo]:
        """Every model present or being fetched, by id."""
        ids = set(self._flights)
        try:
            entries = list(os.scandir(self.cache_dir))
        except FileNotFoundError:
            entries = []
        ids.update(e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
        out = []
        for model_id in sorted(ids):
            try:
                out.append(self.info(model_id))
            except GpudError:
                continue  # an operator's stray dir with an invalid name, or removed meanwhile
        return out

    # --- removal, eviction, verification ----------------------------------------------------------------

    async def remove(self, model_id: str) -> None:
        """Delete a model; Conflict(model_in_use) while a worker has it mounted."""
        path = self.path_for(model_id)
        if self._holders.get(model_id):
            users = ", ".join(sorted(self._holders[model_id]))
            raise Conflict(f"model {model_id!r} is in use by {users}", code="model_in_use")
        if model_id in self._flights:
            raise Conflict(f"model {model_id!r} is being fetched", code="model_fetching")
        if not self._present(path):
            raise NotFound(f"model {model_id!r} is not in the cache", code="model_not_cached")
        await self._discard(model_id, path)

    async def _discard(self, model_id: str, path: Path) -> None:
        # The rename is the removal (atomic, synchronous); the slow delete happens afterwards, off the loop.
        trash = self.cache_dir / f"{disk.TRASH_PREFIX}{model_id}-{secrets.token_hex(6)}"
        os.rename(path, trash)
        self._hand_sizes.pop(model_id, None)
        await self._run(disk.remove_tree, trash)

    async def _evict(self, incoming: int, *, keep: str) -> None:
        """Remove least-recently-used models nobody holds until incoming bytes fit under max_bytes."""
        if self.max_bytes is None:
            return
        models = [m for m in self.list() if m.complete and m.model_id != keep]
        total = sum(m.size_bytes or 0 for m in models) + incoming
        victims = sorted(
            (m for m in models if not m.holders and m.model_id not in self._flights),
            key=lambda m: m.last_used or 0.0,
        )
        for victim in victims:
            if total <= self.max_bytes:
                break
            if self._holders.get(victim.model_id):
                continue  # acquired while we were deleting an earlier victim
            logger.info("evicting model %s (%s bytes) to fit %d bytes", victim.model_id, victim.size_bytes, incoming)
            await self._discard(victim.model_id, Path(victim.path))
            total -= victim.size_bytes or 0
            if self._metrics is not None:
                self._metrics.model_cache_evictions.inc()
        if total > self.max_bytes:
            logger.warning("model cache over its limit (%d > %d bytes): the rest is in use", total, self.max_bytes)

    async def verify(self, model_id: str) -> VerifyResult:
        """Check sizes and sha256 of every file against the manifest (ok=None when there is none)."""
        path = self.path_for(model_id)
        if not self._present(path):
            raise NotFound(f"model {model_id!r} is not in the cache", code="model_not_cached")
        manifest = read_manifest(path)
        if manifest is None:
            return VerifyResult(model_id, None, False, 0, ("no manifest: placed by hand, nothing to verify",))
        problems = await self._run(disk.verify_files, path, manifest)
        return VerifyResult(model_id, not problems, True, len(manifest.files), tuple(problems))
