"""model_id validation: every traversal attempt is InvalidRequest and touches nothing, here or upstream."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpud.errors import InvalidRequest
from gpud.modelstore import ModelStore
from tests.fileservice import FileService

BAD_IDS = [
    "../x",
    "..",
    ".",
    "",
    "/etc/passwd",
    "%2e%2e",
    "%2e%2e%2fetc",
    "..%2fetc",
    "a/b",
    "a/../../b",
    "a\\b",
    "a\x00b",
    "x" * 129,
    ".tmp-x",
    ".trash-x",
    ".gpud-manifest.json",
    "-rf",
    "a..b",
    "caf\u00e9",
    " x",
    "x\n",
    "~root",
]
GOOD_IDS = ["llama-7b", "Qwen2.5-7B_instruct", "a", "x" * 128, "stable-diffusion-xl"]


def snapshot(root: Path) -> dict[str, tuple[int, int, float]]:
    """Every path under root with its mode, size and mtime (links not followed)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
async def store(tmp_path: Path, svc: FileService) -> AsyncIterator[ModelStore]:
    st = ModelStore(tmp_path / "cache", file_service_url=svc.url, internal_key=svc.key, auto_fetch=True)
    await st.start()
    yield st
    await st.close()


@pytest.mark.parametrize("model_id", BAD_IDS)
def test_path_for_refuses(tmp_path: Path, model_id: str) -> None:
    st = ModelStore(tmp_path, file_service_url=None, internal_key=None, auto_fetch=False)
    with pytest.raises(InvalidRequest) as err:
        st.path_for(model_id)
    assert err.value.code == "invalid_model_id"


@pytest.mark.parametrize("model_id", [None, 5, b"llama"])
def test_non_string_refused(tmp_path: Path, model_id: object) -> None:
    st = ModelStore(tmp_path, file_service_url=None, internal_key=None, auto_fetch=False)
    with pytest.raises(InvalidRequest):
        st.path_for(model_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("model_id", GOOD_IDS)
def test_good_ids_map_into_cache(tmp_path: Path, model_id: str) -> None:
    st = ModelStore(tmp_path, file_service_url=None, internal_key=None, auto_fetch=False)
    assert st.path_for(model_id) == Path(os.path.realpath(tmp_path)) / model_id


async def _every_operation(st: ModelStore, model_id: str) -> None:
    """Call every public entry point with model_id; each must refuse it."""
    calls = [
        lambda: st.ensure(model_id),
        lambda: st.prefetch(model_id),
        lambda: st.remove(model_id),
        lambda: st.verify(model_id),
    ]
    for call in calls:
        with pytest.raises(InvalidRequest):
            await call()
    for sync_call in (st.info, st.path_for, lambda m: st.acquire(m, "w1"), lambda m: st.release(m, "w1")):
        with pytest.raises(InvalidRequest):
            sync_call(model_id)


async def test_traversal_touches_nothing(tmp_path: Path, store: ModelStore, svc: FileService) -> None:
    outside = tmp_path / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc" / "passwd").write_text("root:x:0:0")
    (tmp_path / "x").write_text("sibling of the cache")
    (store.cache_dir / "real").mkdir()
    (store.cache_dir / "real" / "w.bin").write_bytes(b"w")
    before = snapshot(tmp_path)
    for model_id in BAD_IDS:
        await _every_operation(store, model_id)
    assert snapshot(tmp_path) == before
    assert sum(svc.requests.values()) == 0, "no bad id may reach the file service"


async def test_symlink_escaping_the_cache_is_refused(tmp_path: Path, store: ModelStore, svc: FileService) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep me")
    (store.cache_dir / "evil").symlink_to(outside)
    (store.cache_dir / "real").mkdir()
    (store.cache_dir / "alias").symlink_to(store.cache_dir / "real")
    before = snapshot(tmp_path)
    for model_id in ("evil", "alias"):
        await _every_operation(store, model_id)
    assert snapshot(tmp_path) == before
    assert (outside / "secret").read_text() == "keep me"
    assert sum(svc.requests.values()) == 0
    # Listing skips them rather than following them.
    assert [m.model_id for m in store.list()] == ["real"]
