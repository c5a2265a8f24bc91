"""ModelStore fetching against the real test file service on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gpud.errors import GpudError, NotFound, Unavailable
from gpud.modelstore import MANIFEST_NAME, FetchPhase, FetchProgress, ModelStore
from gpud.modelstore.archive import ArchiveLimits
from tests.fileservice import FileService
from tests.waiting import wait_until

MiB = 1 << 20
MakeStore = Callable[..., Awaitable[ModelStore]]


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


async def test_sixteen_concurrent_ensure_make_one_request(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 16 * MiB, filename="weights.bin")
    svc.set("m", chunk_delay=0.005)
    st = await make_store()
    seen: list[list[FetchProgress]] = [[] for _ in range(16)]
    paths = await asyncio.gather(*(st.ensure("m", seen[i].append) for i in range(16)))
    assert svc.requests["m"] == 1
    assert len(set(paths)) == 1 and (paths[0] / "weights.bin").stat().st_size == 16 * MiB
    for updates in seen:
        phases = [u.phase for u in updates]
        assert FetchPhase.DOWNLOADING in phases and phases[-1] is FetchPhase.DONE
        assert any(0 < u.bytes_done < 16 * MiB for u in updates), "waiters see bytes move, not just the end"
        assert updates[-1].bytes_done == updates[-1].bytes_total == 16 * MiB
    assert leftovers(st.cache_dir) == []
    # Present now: no more requests.
    await st.ensure("m")
    assert svc.requests["m"] == 1


async def test_late_joiner_gets_progress_and_cancelled_waiter_does_not_stop_fetch(
    make_store: MakeStore, svc: FileService
) -> None:
    svc.add_zeros("m", 24 * MiB)
    svc.set("m", chunk_delay=0.01)
    st = await make_store()
    first: list[FetchProgress] = []
    quitter = asyncio.create_task(st.ensure("m", first.append))
    await wait_until(lambda: any(u.bytes_done > 0 for u in first), "the first bytes to arrive", timeout=10)
    late: list[FetchProgress] = []
    late_task = asyncio.create_task(st.ensure("m", late.append))
    await asyncio.sleep(0)  # one turn of the loop: the joiner's task runs up to its wait on the shared fetch
    assert late and late[0].bytes_done > 0, "a joiner is told where the fetch stands at once"
    assert st.info("m").complete is False and st.info("m").fetching is not None
    quitter.cancel()
    path = await late_task
    assert late[-1].phase is FetchPhase.DONE
    assert (path / "zeros.bin").stat().st_size == 24 * MiB
    assert svc.requests["m"] == 1


async def test_retries_5xx_then_succeeds(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", MiB)
    svc.set("m", fail_times=2, fail_status=502)
    st = await make_store(retries=3)
    await st.ensure("m")
    assert svc.requests["m"] == 3


async def test_gives_up_after_retries_and_next_ensure_tries_again(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", MiB)
    svc.set("m", fail_times=100, fail_status=503)
    st = await make_store(retries=2)
    with pytest.raises(GpudError) as err:
        await st.ensure("m")
    assert err.value.code == "model_fetch_failed" and "503" in err.value.message
    assert svc.requests["m"] == 3
    assert not st.path_for("m").exists() and leftovers(st.cache_dir) == []
    svc.set("m", fail_times=0)
    await st.ensure("m")
    assert svc.requests["m"] == 4


@pytest.mark.parametrize("status", [400, 403, 404, 410])
async def test_no_retry_on_4xx(make_store: MakeStore, svc: FileService, status: int) -> None:
    svc.add_zeros("m", MiB)
    svc.set("m", status=status)
    st = await make_store(retries=3)
    with pytest.raises(GpudError) as err:
        await st.ensure("m")
    assert err.value.code == "model_fetch_failed" and str(status) in err.value.message
    assert svc.requests["m"] == 1


async def test_wrong_key_is_401_without_retry(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", MiB)
    st = await make_store(internal_key="wrong")
    with pytest.raises(GpudError, match="401"):
        await st.ensure("m")
    assert svc.requests["m"] == 0  # refused before the id was even read


async def test_custom_key_header(make_store: MakeStore, svc: FileService) -> None:
    svc.key_header = "X-File-Key"
    svc.add_zeros("m", MiB)
    st = await make_store(key_header="X-File-Key")
    await st.ensure("m")
    assert svc.requests["m"] == 1  # counted only once the key check passed
    assert [h.get("X-File-Key") for h in svc.request_headers] == [svc.key], "the key went in the custom header"
    assert [h.get("X-Internal-Key") for h in svc.request_headers] == [None], "and not in the default one"


async def test_corrupt_download_never_published(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 2 * MiB)
    svc.set("m", corrupt=True)
    st = await make_store()
    with pytest.raises(GpudError) as err:
        await st.ensure("m")
    assert err.value.code == "model_fetch_failed" and "sha256 mismatch" in err.value.message
    assert not st.path_for("m").exists() and leftovers(st.cache_dir) == []
    assert svc.requests["m"] == 1  # the same bytes would come again: no retry


async def test_truncated_download_never_published(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 4 * MiB)
    svc.set("m", truncate_at=MiB + 17)
    st = await make_store(retries=1)
    with pytest.raises(GpudError) as err:
        await st.ensure("m")
    assert err.value.code == "model_fetch_failed" and "truncated" in err.value.message
    assert svc.requests["m"] == 2  # a broken connection is worth one more try
    assert not st.path_for("m").exists() and leftovers(st.cache_dir) == []


async def test_chunked_response_without_length(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 3 * MiB + 5)
    svc.set("m", send_length=False)
    st = await make_store()
    path = await st.ensure("m")
    assert (path / "zeros.bin").stat().st_size == 3 * MiB + 5


async def test_huge_announced_length_refused_before_download(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", MiB)
    svc.set("m", announce_length=1 << 40)
    st = await make_store(max_bytes=64 * MiB)
    with pytest.raises(GpudError, match="over the limit"):
        await st.ensure("m")
    assert svc.requests["m"] == 1 and leftovers(st.cache_dir) == []


async def test_body_over_cap_without_length(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 20 * MiB)
    svc.set("m", send_length=False)
    st = await make_store(limits=ArchiveLimits(max_bytes=8 * MiB))
    with pytest.raises(GpudError, match="over the limit"):
        await st.ensure("m")
    assert leftovers(st.cache_dir) == []


@pytest.mark.parametrize("gzip", [False, True])
async def test_tar_archive_extracted_with_manifest(
    tmp_path: Path, make_store: MakeStore, svc: FileService, gzip: bool
) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "deep" / "w.bin").write_bytes(os.urandom(300_000))
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "latest").symlink_to("sub/deep/w.bin")
    svc.add_tree("m", src, tmp_path / "m.tar", gzip=gzip)
    st = await make_store()
    path = await st.ensure("m")
    assert (path / "sub" / "deep" / "w.bin").read_bytes() == (src / "sub" / "deep" / "w.bin").read_bytes()
    assert os.readlink(path / "latest") == "sub/deep/w.bin"
    assert os.access(path / "run.sh", os.X_OK)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert sorted(f["path"] for f in manifest["files"]) == ["config.json", "run.sh", "sub/deep/w.bin"]
    assert manifest["source"]["sha256_checked"] is True
    assert not (path / "payload").exists()
    info = st.info("m")
    assert info.has_manifest and info.size_bytes == 300_000 + 8 + 10
    assert (await st.verify("m")).ok is True


async def test_corrupt_archive_is_clean_error(tmp_path: Path, make_store: MakeStore, svc: FileService) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(5000))
    svc.add_tar("m", bad, gzip=True)
    st = await make_store()
    with pytest.raises(GpudError, match="archive is corrupt"):
        await st.ensure("m")
    assert not st.path_for("m").exists() and leftovers(st.cache_dir) == []


async def test_unsafe_filename_falls_back(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 10, filename="../../etc/passwd")
    svc.add_zeros("n", 10, filename=".hidden")
    st = await make_store()
    assert sorted(os.listdir(await st.ensure("m"))) == [MANIFEST_NAME, "passwd"]
    assert sorted(os.listdir(await st.ensure("n"))) == [MANIFEST_NAME, "model.bin"]


async def test_hand_placed_model_used_as_is(make_store: MakeStore, svc: FileService) -> None:
    st = await make_store()
    (st.cache_dir / "hand").mkdir()
    (st.cache_dir / "hand" / "w.bin").write_bytes(b"12345")
    assert await st.ensure("hand") == st.path_for("hand")
    assert svc.requests["hand"] == 0
    info = st.info("hand")
    assert info.has_manifest is False and info.size_bytes == 5
    result = await st.verify("hand")
    assert result.ok is None and not result.has_manifest


async def test_without_auto_fetch_absent_is_not_found(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 10)
    st = await make_store(auto_fetch=False)
    with pytest.raises(NotFound) as err:
        await st.ensure("m")
    assert err.value.code == "model_not_cached" and svc.requests["m"] == 0
    # Pre-warm is explicit, so it fetches even then.
    info = await st.prefetch("m")
    assert info.complete and svc.requests["m"] == 1


async def test_no_file_service_configured(make_store: MakeStore) -> None:
    st = await make_store(file_service_url=None)
    with pytest.raises(Unavailable):
        await st.ensure("m")


async def test_unreachable_file_service(make_store: MakeStore) -> None:
    st = await make_store(file_service_url="http://127.0.0.1:9", retries=1)
    with pytest.raises(GpudError) as err:
        await st.ensure("m")
    assert "cannot reach file service" in err.value.message and "2 attempts" in err.value.message


async def test_stalled_service_times_out(make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 10)
    svc.set("m", delay=2.0)
    st = await make_store(request_timeout=0.2, retries=1)
    with pytest.raises(GpudError, match="timed out"):
        await st.ensure("m")
    assert svc.requests["m"] == 2


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """A 4 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


async def test_disk_full_is_clean_error(small_fs: Path, make_store: MakeStore, svc: FileService) -> None:
    svc.add_zeros("m", 16 * MiB)
    st = await make_store(cache_dir=small_fs / "cache")
    with pytest.raises(GpudError) as err:
        await st.ensure("m")
    assert err.value.code == "model_fetch_failed" and "disk full" in err.value.message
    assert os.listdir(st.cache_dir) == []
    assert svc.requests["m"] == 1
