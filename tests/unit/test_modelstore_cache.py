"""Cache behaviour: LRU eviction around acquired models, removal, verification, crash leftovers, listing."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpud.errors import Conflict, NotFound
from gpud.modelstore import ModelStore
from tests.fileservice import FileService

MiB = 1 << 20


@pytest.fixture
async def svc() -> AsyncIterator[FileService]:
    service = FileService()
    for name in "abcde":
        service.add_zeros(name, 4 * MiB)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def store(tmp_path: Path, svc: FileService) -> AsyncIterator[ModelStore]:
    st = ModelStore(
        tmp_path / "cache", file_service_url=svc.url, internal_key=svc.key, auto_fetch=True, max_bytes=10 * MiB
    )
    await st.start()
    yield st
    await st.close()


def age(st: ModelStore, model_id: str, seconds_ago: float) -> None:
    """Pretend the model was last used a while ago (last-used is the directory's mtime)."""
    t = os.stat(st.path_for(model_id)).st_mtime - seconds_ago
    os.utime(st.path_for(model_id), (t, t))


def present(st: ModelStore) -> list[str]:
    return [m.model_id for m in st.list()]


async def test_lru_eviction_skips_acquired(store: ModelStore) -> None:
    await store.ensure("a")
    await store.ensure("b")
    age(store, "a", 300)
    age(store, "b", 100)
    store.acquire("a", "worker-1")
    await store.ensure("c")  # 12 MiB > 10: the oldest *unheld* model goes, which is b
    assert present(store) == ["a", "c"]
    store.release("a", "worker-1")
    age(store, "a", 300)
    await store.ensure("d")
    assert present(store) == ["c", "d"]


async def test_eviction_never_removes_acquired_even_over_limit(store: ModelStore) -> None:
    await store.ensure("a", holder="w1")
    await store.ensure("b", holder="w2")
    await store.ensure("c")
    assert present(store) == ["a", "b", "c"]  # over the limit, but both old ones are mounted
    assert [m.holders for m in store.list()] == [("w1",), ("w2",), ()]


async def test_ensure_refreshes_last_used(store: ModelStore) -> None:
    await store.ensure("a")
    await store.ensure("b")
    age(store, "a", 300)
    age(store, "b", 100)
    await store.ensure("a")  # a hit makes a the most recent
    await store.ensure("c")
    assert present(store) == ["a", "c"]


async def test_remove_refuses_in_use(store: ModelStore) -> None:
    await store.ensure("a")
    store.acquire("a", "w1")
    store.acquire("a", "w2")
    assert store.info("a").refcount == 2
    with pytest.raises(Conflict) as err:
        await store.remove("a")
    assert err.value.code == "model_in_use" and "w1, w2" in err.value.message
    store.release("a", "w1")
    with pytest.raises(Conflict):
        await store.remove("a")
    store.release("a", "w2")
    await store.remove("a")
    assert present(store) == [] and os.listdir(store.cache_dir) == []
    with pytest.raises(NotFound):
        await store.remove("a")
    with pytest.raises(NotFound):
        store.acquire("a", "w3")


async def test_verify_detects_changes(store: ModelStore) -> None:
    path = await store.ensure("a")
    result = await store.verify("a")
    assert result.ok is True and result.files_checked == 1 and result.problems == ()
    (path / "extra.txt").write_text("x")
    with open(path / "zeros.bin", "r+b") as f:
        f.write(b"\x01")
    result = await store.verify("a")
    assert result.ok is False
    assert any("zeros.bin: sha256" in p for p in result.problems)
    assert any("extra.txt: not in the manifest" in p for p in result.problems)
    (path / "zeros.bin").unlink()
    assert any("missing" in p for p in (await store.verify("a")).problems)
    with pytest.raises(NotFound):
        await store.verify("nope")


async def test_start_cleans_crash_leftovers(tmp_path: Path, svc: FileService) -> None:
    cache = tmp_path / "cache"
    (cache / ".tmp-a-123456" / "model").mkdir(parents=True)
    (cache / ".tmp-a-123456" / "payload").write_bytes(b"half")
    (cache / ".trash-b-abcdef").mkdir()
    (cache / ".tmp-stray-file").write_text("x")
    (cache / "kept").mkdir()
    (cache / "kept" / "w").write_text("w")
    st = ModelStore(cache, file_service_url=svc.url, internal_key=svc.key, auto_fetch=True)
    await st.start()
    await st.close()
    assert sorted(os.listdir(cache)) == ["kept"]
    assert (cache / "kept" / "w").read_text() == "w"


async def test_list_and_info(store: ModelStore) -> None:
    (store.cache_dir / "hand").mkdir()
    (store.cache_dir / "hand" / "w").write_bytes(b"123")
    await store.ensure("a", holder="w1")
    listed = {m.model_id: m for m in store.list()}
    assert set(listed) == {"a", "hand"}
    a, hand = listed["a"], listed["hand"]
    assert a.complete and a.has_manifest and a.size_bytes == 4 * MiB and a.holders == ("w1",)
    assert not hand.has_manifest and hand.size_bytes == 3 and hand.refcount == 0
    assert a.to_dict()["in_use_by"] == ["w1"] and a.last_used is not None
    with pytest.raises(NotFound):
        store.info("absent")
