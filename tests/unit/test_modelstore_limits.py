"""Archive caps, iterative tree removal, the fetch's pace (minimum rate, deadline) and cancelling a shared fetch."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gpud.errors import GpudError
from gpud.gpu.inventory import open_inventory
from gpud.gpu.scheduler import Scheduler
from gpud.modelstore import ModelStore, disk
from gpud.modelstore.archive import ArchiveLimits, ExtractCaps, ExtractionStopped, UnsafeArchive, extract_tar
from gpud.modelstore.config import archive_limits, fetch_pace
from gpud.modelstore.pace import FetchPace, RateGuard
from gpud.settings import load
from tests.fileservice import FileService, tar_bytes
from tests.waiting import wait_until

MiB = 1 << 20
MakeStore = Callable[..., Awaitable[ModelStore]]
DEFAULT = ArchiveLimits()


def reg(name: str, data: bytes = b"") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def caps(**kw: Any) -> ExtractCaps:
    return ArchiveLimits(**kw).caps_for(0, None)


def extract(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], c: ExtractCaps) -> Path:
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes(members))
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_tar(archive, dest, caps=c)
    return dest


def nested(tmp_path: Path, name: str, levels: int, part: str) -> Path:
    """A tree `levels` deep below tmp_path/name, built relative to directory fds (its full path may be longer
    than PATH_MAX), with a file and a symlink to / every 100 levels."""
    root = tmp_path / name
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(levels):
            if level % 100 == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
                os.symlink("/", "up", dir_fd=fd)
            os.mkdir(part, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    return root


# --- archive caps ------------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    assert (DEFAULT.max_bytes, DEFAULT.max_ratio, DEFAULT.max_entries, DEFAULT.max_depth, DEFAULT.max_path) == (
        1 << 40, 50, 20_000, 32, 1024,
    )  # fmt: skip


def test_settings_defaults_are_the_stores_defaults() -> None:
    settings = load(None, environ={})
    assert archive_limits(settings) == ArchiveLimits() and fetch_pace(settings) == FetchPace()
    off = load(None, environ={"GPUD_MODEL_FETCH_DEADLINE": "none", "GPUD_MODEL_ARCHIVE_MAX_RATIO": "none"})
    assert fetch_pace(off).deadline is None and archive_limits(off).max_ratio is None


def test_byte_cap_is_the_smallest_that_applies() -> None:
    limits = ArchiveLimits(max_bytes=1 << 30, max_ratio=50)
    c = limits.caps_for(3 * MiB, cache_max=None)
    assert c.max_bytes == 150 * MiB + 16 * MiB and "GPUD_MODEL_ARCHIVE_MAX_RATIO" in c.bytes_why
    assert limits.caps_for(100 * MiB, cache_max=None).bytes_why == "GPUD_MODEL_ARCHIVE_MAX_BYTES"
    assert "GPUD_MODEL_CACHE_MAX_BYTES" in limits.caps_for(3 * MiB, cache_max=MiB).bytes_why
    assert ArchiveLimits(max_bytes=None, max_ratio=None).caps_for(5, None).max_bytes is None


@pytest.mark.parametrize(
    ("members", "limits", "setting"),
    [
        ([reg("/".join(["d"] * 33))], {}, "GPUD_MODEL_ARCHIVE_MAX_DEPTH"),
        ([reg("/".join(["x" * 200] * 30))], {}, "a 6029-byte path, over the limit of 1024"),
        ([reg("/".join(["x" * 200] * 6))], {}, "GPUD_MODEL_ARCHIVE_MAX_PATH"),
        ([reg("y" * 256)], {}, "longer than 255 bytes"),
        ([reg(f"f{i}") for i in range(11)], {"max_entries": 10}, "GPUD_MODEL_ARCHIVE_MAX_ENTRIES"),
        ([reg("a", b"1" * 600), reg("b", b"1" * 600)], {"max_bytes": 1000}, "GPUD_MODEL_ARCHIVE_MAX_BYTES"),
    ],
    ids=["depth", "6000-char path", "path length", "name length", "entries", "bytes"],
)
def test_caps_refuse_before_writing(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], limits: dict[str, int], setting: str
) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes(members))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match=setting):
        extract_tar(archive, dest, caps=caps(**limits))
    if setting != "GPUD_MODEL_ARCHIVE_MAX_ENTRIES" and setting != "GPUD_MODEL_ARCHIVE_MAX_BYTES":
        assert os.listdir(dest) == [], "a path refused is refused before any of its directories is made"


def test_long_symlink_target_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("link")
    info.type, info.linkname = tarfile.SYMTYPE, "a/" * 600
    with pytest.raises(UnsafeArchive, match="GPUD_MODEL_ARCHIVE_MAX_PATH"):
        extract(tmp_path, [(info, b"")], caps())


def test_oversized_extended_header_refused_unread(tmp_path: Path) -> None:
    # A pax header is read into memory whole by tarfile: a big one must be refused from its size alone.
    info = tarfile.TarInfo("f")
    info.pax_headers = {"comment": "z" * (200 << 10)}
    with pytest.raises(UnsafeArchive, match="extended header"):
        extract(tmp_path, [(info, b"")], caps())


def test_ratio_cap_stops_a_gzip_bomb_and_names_the_setting(tmp_path: Path) -> None:
    raw = tar_bytes([reg(f"z{i}", bytes(8 * MiB)) for i in range(8)])
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(gzip.compress(raw))
    size = archive.stat().st_size
    c = ArchiveLimits(max_ratio=50).caps_for(size, None)
    assert c.max_bytes is not None and c.max_bytes < 64 * MiB
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match="GPUD_MODEL_ARCHIVE_MAX_RATIO"):
        extract_tar(archive, dest, caps=c)
    written = sum(p.stat().st_size for p in dest.iterdir())
    assert written <= c.max_bytes


def test_real_weights_within_the_ratio(tmp_path: Path) -> None:
    """Incompressible weights and a little text fit easily; the slack covers small text-only archives."""
    members = [reg("w.bin", os.urandom(2 * MiB)), reg("tokenizer.json", b'{"a": 1}\n' * 200_000)]
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(gzip.compress(tar_bytes(members)))
    dest = tmp_path / "dest"
    dest.mkdir()
    entries = extract_tar(archive, dest, caps=DEFAULT.caps_for(archive.stat().st_size, None))
    assert sorted(e.path for e in entries) == ["tokenizer.json", "w.bin"]


def test_extraction_stops_when_told(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes([reg("a", b"1")]))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ExtractionStopped):
        extract_tar(archive, dest, caps=caps(), stop=stop)


# --- tree removal ------------------------------------------------------------------------------------


def test_remove_tree_deeper_than_recursion_and_path_max(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    root = nested(tmp_path, ".tmp-deep", 3000, "a")  # 6000 characters below root, > PATH_MAX
    for i in range(3):
        (root / f"w{i}").mkdir()
    started = time.monotonic()
    assert disk.remove_tree(root) is True
    assert not root.exists() and (outside / "keep").read_text() == "k"
    assert time.monotonic() - started < 20


def test_remove_tree_of_file_link_and_missing(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    assert disk.remove_tree(tmp_path / "l") and (tmp_path / "f").exists()
    assert disk.remove_tree(tmp_path / "f") and not (tmp_path / "f").exists()
    assert disk.remove_tree(tmp_path / "nothing")


def test_clean_temporaries_removes_deep_leftovers(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    nested(cache, ".tmp-m-1", 3000, "a")
    nested(cache, ".trash-m-2", 40, "b" * 200)
    (cache / "model").mkdir()
    assert sorted(disk.clean_temporaries(cache)) == [".tmp-m-1", ".trash-m-2"]
    assert os.listdir(cache) == ["model"]


async def test_store_start_survives_a_cleanup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cache_dir: Path) -> list[str]:
        raise RecursionError("what shutil.rmtree used to raise")

    monkeypatch.setattr(disk, "clean_temporaries", broken)
    store = ModelStore(tmp_path / "cache", file_service_url=None, internal_key=None, auto_fetch=False)
    await store.start()  # logs, does not raise
    assert (tmp_path / "cache").is_dir()


# --- pace ----------------------------------------------------------------------------------------------


def test_rate_guard_deadline_moves_with_bytes() -> None:
    guard = RateGuard(min_rate=100, window=10.0, start=0.0)  # 1000 bytes per 10 s
    assert guard.fail_at() == 10.0
    guard.record(1.0, 500)
    assert guard.fail_at() == 10.0, "500 bytes are not enough for the first window"
    guard.record(2.0, 1200)
    assert guard.fail_at() == 11.0, "the window must now pass the 500 received at t=1"
    guard.record(5.0, 2000)
    assert guard.fail_at() == 12.0, "the 500 of t=1 no longer matter; the 1200 of t=2 do"
    guard.record(11.5, 2600)
    assert guard.fail_at() == 15.0
    assert RateGuard(None, 10.0, 0.0).fail_at() is None


@pytest.fixture
async def make_store(tmp_path: Path, svc: FileService) -> AsyncIterator[MakeStore]:
    stores: list[ModelStore] = []

    async def make(**kw: Any) -> ModelStore:
        kw.setdefault("auto_fetch", True)
        kw.setdefault("file_service_url", svc.url)
        kw.setdefault("internal_key", svc.key)
        kw.setdefault("retry_backoff", 0.01)
        st = ModelStore(kw.pop("cache_dir", tmp_path / "cache"), **kw)
        await st.start()
        stores.append(st)
        return st

    yield make
    for st in stores:
        await st.close()


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("."))


async def test_slow_loris_fails_on_the_minimum_rate(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 4 * MiB)
    svc.set("m", chunk_delay=0.1, chunk_size=1024)  # ~10 KiB/s
    st = await make_store(retries=1, pace=FetchPace(min_rate=64 << 10, window=0.5, deadline=None))
    started = time.monotonic()
    with pytest.raises(GpudError) as err:
        await st.ensure("m")
    assert err.value.code == "model_fetch_failed" and "GPUD_MODEL_FETCH_MIN_RATE" in err.value.message
    assert "2 attempts" in err.value.message and svc.requests["m"] == 2
    assert time.monotonic() - started < 5
    assert leftovers(st.cache_dir) == []


async def test_deadline_bounds_the_whole_fetch(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 4 * MiB)
    svc.set("m", chunk_delay=0.05, chunk_size=64 << 10)  # ~1.3 MB/s: above the rate, but long
    st = await make_store(pace=FetchPace(min_rate=1024, window=5.0, deadline=0.5))
    with pytest.raises(GpudError, match="GPUD_MODEL_FETCH_DEADLINE"):
        await st.ensure("m")
    assert leftovers(st.cache_dir) == []


async def test_fast_fetch_passes_the_default_pace(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 8 * MiB)
    st = await make_store(pace=FetchPace(min_rate=1 << 20, window=0.2, deadline=30))
    assert (await st.ensure("m")).is_dir()


# --- cancelling a shared fetch -------------------------------------------------------------------------


async def test_last_waiter_leaving_cancels_the_fetch(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 64 * MiB)
    svc.set("m", chunk_delay=0.02)
    st = await make_store()
    waiters = [asyncio.create_task(st.ensure("m")) for _ in range(2)]
    await wait_until(lambda: leftovers(st.cache_dir) != [], "the fetch to start", timeout=10)
    waiters[0].cancel()
    await asyncio.gather(waiters[0], return_exceptions=True)
    assert st.info("m").fetching is not None, "another task still waits: the download goes on"
    started = time.monotonic()
    waiters[1].cancel()
    await asyncio.gather(waiters[1], return_exceptions=True)
    assert time.monotonic() - started < 1.0
    assert leftovers(st.cache_dir) == [], "the last waiter returns once the temporaries are gone"
    with pytest.raises(GpudError, match="not in the cache"):
        st.info("m")
    # A newcomer starts afresh.
    svc.set("m", chunk_delay=0)
    assert (await st.ensure("m")).is_dir() and svc.requests["m"] == 2


async def test_waiter_of_a_fetch_stopped_by_close_gets_an_error(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 64 * MiB)
    svc.set("m", chunk_delay=0.02)
    st = await make_store()
    waiter = asyncio.create_task(st.ensure("m"))
    await wait_until(lambda: leftovers(st.cache_dir) != [], "the fetch to start", timeout=10)
    await st.close()
    with pytest.raises(GpudError) as err:
        await waiter
    assert err.value.code == "model_fetch_failed" and "shutting down" in err.value.message
    assert leftovers(st.cache_dir) == []


async def test_cancel_during_extraction_waits_for_the_thread(
    tmp_path: Path, make_store: MakeStore, svc: FileService
) -> None:
    members = [reg(f"f{i}", os.urandom(64 << 10)) for i in range(400)]
    buf = io.BytesIO(tar_bytes(members))
    (tmp_path / "m.tar").write_bytes(buf.getvalue())
    svc.add_tar("m", tmp_path / "m.tar")
    st = await make_store()
    phases: list[str] = []
    waiter = asyncio.create_task(st.ensure("m", lambda u: phases.append(u.phase.value)))
    await wait_until(lambda: "extracting" in phases, "extraction to begin", timeout=10)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert leftovers(st.cache_dir) == [] and not st.path_for("m").exists()


# --- the scheduler's check ------------------------------------------------------------------------------


def test_scheduler_check_leases_nothing() -> None:
    scheduler = Scheduler(open_inventory("static", (0,), {0: "low"}))
    scheduler.check("low")
    assert scheduler.leases() == []
    lease = scheduler.acquire("low", "t", "task")
    with pytest.raises(GpudError) as err:
        scheduler.check("low")
    assert err.value.code == "no_gpu_available"
    with pytest.raises(GpudError) as err:
        scheduler.check("high")
    assert err.value.code == "no_gpu_for_difficulty"
    scheduler.release(lease)
