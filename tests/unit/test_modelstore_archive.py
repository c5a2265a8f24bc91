"""Safe extraction: hostile archives are refused and nothing outside the destination is written."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from gpud.errors import GpudError
from gpud.modelstore import ModelStore
from gpud.modelstore.archive import ArchiveLimits, ExtractCaps, UnsafeArchive, extract_tar
from tests.fileservice import FileService, tar_bytes

Member = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"data", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def sym(name: str, target: str) -> Member:
    return special(name, tarfile.SYMTYPE, target)


def byte_cap(max_bytes: int | None) -> ExtractCaps:
    """The default caps, with only an absolute byte cap."""
    return ArchiveLimits(max_bytes=max_bytes, max_ratio=None).caps_for(0, None)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


HOSTILE: dict[str, list[Member]] = {
    "absolute": [reg("/tmp/gpud-evil")],
    "dotdot": [reg("../evil")],
    "nested dotdot": [reg("a/../../evil")],
    "backslash": [reg("a\\..\\b")],
    "symlink absolute": [sym("link", "/etc")],
    "symlink escaping": [sym("link", "../outside")],
    "symlink deep escaping": [sym("a/b/link", "../../../outside")],
    "write through symlink": [special("sub", tarfile.DIRTYPE), sym("d", "sub"), reg("d/x")],
    "symlink chain": [sym("a/b/y", "../.."), sym("a/b/x", "y/../..")],
    "hardlink absolute": [special("h", tarfile.LNKTYPE, "/etc/passwd")],
    "hardlink dotdot": [special("h", tarfile.LNKTYPE, "../outside/secret")],
    "hardlink missing": [special("h", tarfile.LNKTYPE, "nope")],
    "hardlink to symlink": [sym("s", "x"), reg("x"), special("h", tarfile.LNKTYPE, "s")],
    "char device": [special("tty", tarfile.CHRTYPE)],
    "block device": [special("sda", tarfile.BLKTYPE)],
    "fifo": [special("pipe", tarfile.FIFOTYPE)],
    "duplicate": [reg("w"), reg("w")],
    "reserved name": [reg(".gpud-manifest.json", b"{}")],
    "over size cap": [reg("a", b"x" * 600), reg("b", b"x" * 600)],
    "dir replaces file": [reg("w"), special("w", tarfile.DIRTYPE)],
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_refused(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    archive = tmp_path / "x.tar"
    archive.write_bytes(tar_bytes(HOSTILE[case]))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchive):
        extract_tar(archive, dest, caps=byte_cap(1000), reserved=frozenset({".gpud-manifest.json"}))
    written_outside = {p for p in tree(tmp_path) if p != "dest" and not p.startswith("dest/")}
    assert written_outside == {"outside", "outside/secret", "x.tar"}
    assert not Path("/tmp/gpud-evil").exists()


def test_gzip_bomb_stops_at_cap(tmp_path: Path) -> None:
    raw = tar_bytes([reg("zeros", bytes(20 << 20))])
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(gzip.compress(raw))
    assert archive.stat().st_size < 100_000
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match="more than the limit"):
        extract_tar(archive, dest, caps=byte_cap(1 << 20))
    assert not (dest / "zeros").exists()


def test_benign_archive_extracts(tmp_path: Path) -> None:
    members = [
        special("./", tarfile.DIRTYPE),
        reg("./a/b/w.bin", b"weights"),
        reg("run", b"#!", mode=0o700),
        sym("a/latest", "b/w.bin"),
        special("a/hard", tarfile.LNKTYPE, "a/b/w.bin"),
        sym("blobs-link", "a/../a/b"),
    ]
    archive = tmp_path / "ok.tar"
    archive.write_bytes(tar_bytes(members))
    dest = tmp_path / "dest"
    dest.mkdir()
    entries = extract_tar(archive, dest, caps=byte_cap(None))
    assert [(e.path, e.size) for e in entries] == [("a/b/w.bin", 7), ("run", 2)]
    assert (dest / "a" / "latest").read_bytes() == b"weights"
    assert (dest / "a" / "hard").read_bytes() == b"weights"
    assert oct((dest / "run").stat().st_mode & 0o777) == oct(0o755)  # readable by the worker's user


async def test_hostile_archive_through_store(tmp_path: Path, svc: FileService) -> None:
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(gzip.compress(tar_bytes([reg("ok", b"fine"), reg("../../escaped", b"x")])))
    svc.add_tar("evil", archive, gzip=True)
    st = ModelStore(tmp_path / "cache", file_service_url=svc.url, internal_key=svc.key, auto_fetch=True)
    await st.start()
    try:
        with pytest.raises(GpudError) as err:
            await st.ensure("evil")
    finally:
        await st.close()
    assert err.value.code == "model_fetch_failed" and "archive refused" in err.value.message
    assert "'..'" in err.value.message
    assert os.listdir(tmp_path / "cache") == []
    assert not (tmp_path / "escaped").exists()


def test_tar_bytes_helper_roundtrip() -> None:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes([reg("x", b"1")]))) as tf:
        assert tf.getnames() == ["x"]
