"""Blocking filesystem steps of the model store; each runs in a worker thread."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path

from gpud.modelstore.archive import FileEntry, fsync_dir, fsync_tree
from gpud.modelstore.manifest import MANIFEST_NAME, Manifest

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
HASH_CHUNK = 4 << 20


def clean_temporaries(cache_dir: Path) -> list[str]:
    """Create cache_dir if needed and delete what a crash left behind (unfinished fetches, half removals)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    removed = []
    for entry in os.scandir(cache_dir):
        if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            remove_tree(Path(entry.path))
            removed.append(entry.name)
    return removed


def remove_tree(path: Path) -> None:
    """Delete a directory tree (or a stray file or link) without following links out of it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(staged: Path, final: Path) -> bool:
    """fsync staged, then rename it to final atomically; False if final already exists (someone was first)."""
    fsync_tree(staged)
    try:
        os.rename(staged, final)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    fsync_dir(final.parent)
    return True


def dir_size(path: Path) -> int:
    """Bytes of the regular files under path (links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in large chunks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_entry(model_dir: Path, entry: FileEntry) -> str | None:
    """A problem with one manifest entry, or None."""
    path = model_dir / entry.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{entry.path}: missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{entry.path}: not a regular file"
    if st.st_size != entry.size:
        return f"{entry.path}: size {st.st_size}, manifest says {entry.size}"
    if sha256_file(path) != entry.sha256:
        return f"{entry.path}: sha256 differs from the manifest"
    return None


def verify_files(model_dir: Path, manifest: Manifest) -> list[str]:
    """Every difference between model_dir and its manifest (missing, changed or unexpected files)."""
    problems = [p for e in manifest.files if (p := _check_entry(model_dir, e)) is not None]
    known = {e.path for e in manifest.files} | {MANIFEST_NAME}
    for dirpath, _dirs, files in os.walk(model_dir):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, model_dir)
            if rel not in known and stat.S_ISREG(os.lstat(full).st_mode):
                problems.append(f"{rel}: not in the manifest")
    return problems
