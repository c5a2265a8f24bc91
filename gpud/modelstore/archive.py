"""Safe extraction of a model tar archive (optionally compressed); runs in a worker thread, never on the loop."""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """One regular file stored for a model: path relative to the model dir, size and sha256."""

    path: str
    size: int
    sha256: str


class UnsafeArchive(Exception):
    """The archive holds something gpud refuses to extract; the message says what and why."""


def _safe_name(name: str, reserved: frozenset[str]) -> str | None:
    """The member's normalised relative path, None for the archive root, or UnsafeArchive."""
    if "\x00" in name or name.startswith("/") or "\\" in name:
        raise UnsafeArchive(f"archive entry {name!r} has an absolute path or a forbidden character")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"archive entry {name!r} contains '..'")
    if not parts:
        return None
    if parts[0] in reserved:
        raise UnsafeArchive(f"archive entry {name!r} uses a name reserved by gpud")
    return "/".join(parts)


def _make_parents(root: Path, rel: str) -> None:
    """Create rel's parent directories, refusing to pass through a symlink or a non-directory."""
    current = root
    for part in rel.split("/")[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            # A symlink here is how "link then write through it" escapes are built.
            raise UnsafeArchive(f"archive writes through {rel!r}, whose parent is not a plain directory")


def _write_file(tf: tarfile.TarFile, member: tarfile.TarInfo, rel: str, target: Path) -> FileEntry:
    """Copy one member to target (never following or replacing anything), hashing as it goes; fsync it."""
    src = tf.extractfile(member)
    if src is None:
        raise UnsafeArchive(f"archive entry {member.name!r} cannot be read")
    mode = 0o755 if member.mode & 0o111 else 0o644
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError as exc:
        raise UnsafeArchive(f"archive entry {member.name!r} appears twice") from exc
    digest = hashlib.sha256()
    size = 0
    try:
        while chunk := src.read(COPY_CHUNK):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            size += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return FileEntry(path=rel, size=size, sha256=digest.hexdigest())


def _check_symlink(rel: str, linkname: str) -> None:
    """Refuse a symlink whose target is absolute or climbs out of the model directory (lexically)."""
    if not linkname or "\x00" in linkname or linkname.startswith("/"):
        raise UnsafeArchive(f"symlink {rel!r} -> {linkname!r} is absolute or empty")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), linkname))
    if joined == ".." or joined.startswith("../"):
        raise UnsafeArchive(f"symlink {rel!r} -> {linkname!r} points outside the model")


def _hardlink(dest: Path, rel: str, member: tarfile.TarInfo, reserved: frozenset[str]) -> None:
    """Make a hard link to an already extracted regular file of this archive."""
    source_rel = _safe_name(member.linkname, reserved)
    if source_rel is None:
        raise UnsafeArchive(f"hard link {rel!r} has an invalid target")
    source = dest / source_rel
    try:
        st = os.lstat(source)
    except FileNotFoundError as exc:
        raise UnsafeArchive(f"hard link {rel!r} -> {member.linkname!r}: target not in archive") from exc
    if not stat.S_ISREG(st.st_mode) or os.path.realpath(source.parent) != str(source.parent):
        raise UnsafeArchive(f"hard link {rel!r} -> {member.linkname!r}: target is not a regular file")
    os.link(source, dest / rel, follow_symlinks=False)


def extract_tar(
    archive: Path, dest: Path, *, max_bytes: int | None, reserved: frozenset[str] = frozenset()
) -> list[FileEntry]:
    """Extract archive (tar, tar.gz, tar.bz2, tar.xz) into the existing empty dir dest; return regular files."""
    entries: list[FileEntry] = []
    links: list[tuple[str, Path]] = []
    total = 0
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            rel = _safe_name(member.name, reserved)
            if rel is None:
                continue
            target = dest / rel
            _make_parents(dest, rel)
            if member.isreg():
                total += member.size
                if max_bytes is not None and total > max_bytes:
                    raise UnsafeArchive(f"archive unpacks to more than the limit of {max_bytes} bytes")
                entries.append(_write_file(tf, member, rel, target))
            elif member.isdir():
                if os.path.lexists(target):
                    if not stat.S_ISDIR(os.lstat(target).st_mode):
                        raise UnsafeArchive(f"archive entry {member.name!r} replaces a non-directory")
                else:
                    os.mkdir(target, 0o755)
            elif member.issym():
                _check_symlink(rel, member.linkname)
                os.symlink(member.linkname, target)
                links.append((rel, target))
            elif member.islnk():
                _hardlink(dest, rel, member, reserved)
            else:
                raise UnsafeArchive(f"archive entry {member.name!r} is a device, fifo or other special file")
    _check_links_resolve_inside(dest, links)
    return entries


def _check_links_resolve_inside(dest: Path, links: list[tuple[str, Path]]) -> None:
    """A chain of individually harmless links can still climb out; resolve each one for real."""
    root = os.path.realpath(dest)
    for rel, target in links:
        resolved = os.path.realpath(target)
        if resolved != root and not resolved.startswith(root + os.sep):
            raise UnsafeArchive(f"symlink {rel!r} resolves outside the model")


def fsync_tree(root: Path) -> None:
    """fsync every directory under root (files are fsynced as they are written), deepest first."""
    for dirpath, _dirnames, _files in os.walk(root, topdown=False):
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """fsync one directory so a rename or new entry in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
