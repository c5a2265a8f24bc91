"""Blocking filesystem steps of the model store; each runs in a worker thread."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from gpud.modelstore.archive import FileEntry, fsync_dir, fsync_tree
from gpud.modelstore.manifest import MANIFEST_NAME, Manifest

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
HASH_CHUNK = 4 << 20


def clean_temporaries(cache_dir: Path) -> list[str]:
    """Create cache_dir if needed and delete what a crash left behind (unfinished fetches, half removals).

    Never raises for a leftover it cannot delete: that is logged and left for the next start."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    removed = []
    for entry in os.scandir(cache_dir):
        if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and remove_tree(Path(entry.path)):
            removed.append(entry.name)
    return removed


def remove_tree(path: Path) -> bool:
    """Delete a directory tree (or a stray file or link) without following links out of it; True when gone.

    Iterative and relative to directory file descriptors, so neither a tree deeper than Python's recursion limit
    nor paths longer than PATH_MAX stop it. Errors are logged, never raised: removal is always cleanup."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return True
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return True
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, exc)
        return False
    try:
        _empty_dir(fd, path)
    except OSError as exc:
        logger.warning("cannot empty %s: %s", path, exc)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, exc)
        return False
    return True


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Level:
    """One directory on the way down: its name in its parent, its parent's identity, subdirectories to visit."""

    name: str
    parent_id: tuple[int, int]
    pending: list[str] = field(default_factory=list)


def _scan(fd: int) -> list[str]:
    """Unlink every non-directory in the directory fd; return the names of its subdirectories."""
    subdirs = []
    with os.scandir(fd) as it:
        entries = list(it)
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
        except FileNotFoundError:
            continue
    return subdirs


def _empty_dir(root_fd: int, root: Path) -> None:
    """Delete everything below root_fd, depth first, holding two descriptors at most: it walks down by name and
    back up through "..", checking on the way up that ".." is the directory it came from."""
    stack: list[_Level] = []
    cur = os.dup(root_fd)
    pending = _safe_scan(cur, root)
    try:
        while True:
            if pending:
                name = pending.pop()
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=cur)
                except OSError as exc:
                    logger.warning("cannot remove %s/.../%s: %s", root, name, exc)
                    continue
                st = os.fstat(cur)
                stack.append(_Level(name, (st.st_dev, st.st_ino), pending))
                os.close(cur)
                cur = child
                pending = _safe_scan(cur, root)
                continue
            if not stack:
                return
            level = stack.pop()
            parent = os.open("..", _DIR_FLAGS, dir_fd=cur)
            os.close(cur)
            cur = parent
            st = os.fstat(cur)
            if (st.st_dev, st.st_ino) != level.parent_id:
                logger.warning("%s changed while it was being removed; leaving the rest", root)
                return
            try:
                os.rmdir(level.name, dir_fd=cur)
            except OSError as exc:
                logger.warning("cannot remove a directory under %s: %s", root, exc)
            pending = level.pending
    finally:
        os.close(cur)


def _safe_scan(fd: int, root: Path) -> list[str]:
    try:
        return _scan(fd)
    except OSError as exc:
        logger.warning("cannot empty a directory under %s: %s", root, exc)
        return []


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
