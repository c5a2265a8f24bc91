"""Safe extraction of a model tar archive (optionally compressed); runs in a worker thread, never on the loop."""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COPY_CHUNK = 1 << 20
NAME_MAX = 255  # bytes per path component (Linux filesystems refuse longer names anyway)
PATH_MAX = 4096  # bytes of a whole path, the kernel's limit
RATIO_SLACK = 16 << 20  # bytes allowed on top of the compression-ratio cap, for small archives of text
META_MAX_BYTES = 64 << 10  # an extended (pax or GNU long name) header larger than this is refused unread
META_MAX_CHAIN = 8  # extended headers in a row before one member
_META_TYPES = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE})  # fmt: skip


@dataclass(frozen=True)
class FileEntry:
    """One regular file stored for a model: path relative to the model dir, size and sha256."""

    path: str
    size: int
    sha256: str


class UnsafeArchive(Exception):
    """The archive holds something gpud refuses to extract; the message says what and why."""


class ExtractionStopped(Exception):
    """The extraction was told to stop (its fetch was cancelled); what it wrote is the caller's to remove."""


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may unpack to (settings GPUD_MODEL_ARCHIVE_*); None switches a byte cap off."""

    max_bytes: int | None = 1 << 40
    max_ratio: int | None = 50  # unpacked bytes <= max_ratio x the download + RATIO_SLACK
    max_entries: int = 20_000
    max_depth: int = 32  # path components of one entry
    max_path: int = 1024  # bytes of one entry's path (and of a symlink's target)

    def caps_for(self, payload_bytes: int, cache_max: int | None) -> ExtractCaps:
        """The caps for one archive of payload_bytes, the byte cap being the smallest that applies."""
        byte_caps = [(cache_max, "the cache limit GPUD_MODEL_CACHE_MAX_BYTES")]
        byte_caps.append((self.max_bytes, "GPUD_MODEL_ARCHIVE_MAX_BYTES"))
        if self.max_ratio is not None:
            ratio_cap = self.max_ratio * payload_bytes + RATIO_SLACK
            why = f"GPUD_MODEL_ARCHIVE_MAX_RATIO: {self.max_ratio} x the {payload_bytes}-byte download + 16 MiB"
            byte_caps.append((ratio_cap, why))
        known = [(cap, why) for cap, why in byte_caps if cap is not None]
        cap, why = min(known) if known else (None, "")
        return ExtractCaps(cap, why, self.max_entries, self.max_depth, self.max_path)


@dataclass(frozen=True)
class ExtractCaps:
    """The caps of one extraction; bytes_why names the setting behind max_bytes."""

    max_bytes: int | None
    bytes_why: str
    max_entries: int
    max_depth: int
    max_path: int


NO_CAPS = ExtractCaps(None, "", 1 << 62, 1 << 62, PATH_MAX)


def _safe_name(name: str, reserved: frozenset[str], caps: ExtractCaps = NO_CAPS) -> str | None:
    """The member's normalised relative path, None for the archive root, or UnsafeArchive."""
    if "\x00" in name or name.startswith("/") or "\\" in name:
        raise UnsafeArchive(f"archive entry {name[:200]!r} has an absolute path or a forbidden character")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"archive entry {name[:200]!r} contains '..'")
    if not parts:
        return None
    if parts[0] in reserved:
        raise UnsafeArchive(f"archive entry {name!r} uses a name reserved by gpud")
    rel = "/".join(parts)
    # Checked before anything is created: a path too deep or too long would otherwise fail half way
    # (ENAMETOOLONG) after building a tree that is itself hard to remove.
    if len(parts) > caps.max_depth:
        raise UnsafeArchive(
            f"archive entry {name[:200]!r}... is {len(parts)} levels deep, over the limit of {caps.max_depth}"
            " (GPUD_MODEL_ARCHIVE_MAX_DEPTH)"
        )
    size = len(rel.encode(errors="surrogateescape"))
    if size > caps.max_path:
        raise UnsafeArchive(
            f"archive entry {name[:200]!r}... has a {size}-byte path, over the limit of {caps.max_path}"
            " (GPUD_MODEL_ARCHIVE_MAX_PATH)"
        )
    if any(len(p.encode(errors="surrogateescape")) > NAME_MAX for p in parts):
        raise UnsafeArchive(f"archive entry {name[:200]!r}... has a name longer than {NAME_MAX} bytes")
    return rel


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


def _write_file(
    tf: tarfile.TarFile, member: tarfile.TarInfo, rel: str, target: Path, budget: int | None, stop: threading.Event
) -> FileEntry:
    """Copy one member to target (never following or replacing anything), hashing as it goes. Not fsynced here:
    fsync_tree does that once the whole archive is accepted, so a refused one costs no syncs.
    More than `budget` bytes (a sparse member can unpack to more than its header says) is UnsafeArchive."""
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
            if stop.is_set():
                raise ExtractionStopped()
            if budget is not None and size + len(chunk) > budget:
                raise UnsafeArchive("archive unpacks to more bytes than its headers say, over the limit")
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            size += len(chunk)
    finally:
        os.close(fd)
    return FileEntry(path=rel, size=size, sha256=digest.hexdigest())


def _check_symlink(rel: str, linkname: str, max_path: int) -> None:
    """Refuse a symlink whose target is absolute, too long, or climbs out of the model directory (lexically)."""
    if not linkname or "\x00" in linkname or linkname.startswith("/"):
        raise UnsafeArchive(f"symlink {rel!r} -> {linkname[:200]!r} is absolute or empty")
    if len(linkname.encode(errors="surrogateescape")) > max_path:
        raise UnsafeArchive(f"symlink {rel!r} has a target longer than {max_path} bytes (GPUD_MODEL_ARCHIVE_MAX_PATH)")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), linkname))
    if joined == ".." or joined.startswith("../"):
        raise UnsafeArchive(f"symlink {rel!r} -> {linkname!r} points outside the model")


def _hardlink(dest: Path, rel: str, member: tarfile.TarInfo, reserved: frozenset[str], caps: ExtractCaps) -> None:
    """Make a hard link to an already extracted regular file of this archive."""
    source_rel = _safe_name(member.linkname, reserved, caps)
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


class _CheckedInfo(tarfile.TarInfo):
    """A TarInfo that refuses an oversized extended header before tarfile reads it into memory, and endless
    chains of them before tarfile recurses through them."""

    def _proc_member(self, tarfile: Any) -> Any:
        chain = getattr(tarfile, "_gpud_meta_chain", 0) + 1 if self.type in _META_TYPES else 0
        if chain and self.size > META_MAX_BYTES:
            raise UnsafeArchive(f"archive has a {self.size}-byte extended header (at most {META_MAX_BYTES})")
        if chain > META_MAX_CHAIN:
            raise UnsafeArchive(f"archive has more than {META_MAX_CHAIN} extended headers in a row")
        tarfile._gpud_meta_chain = chain
        return super()._proc_member(tarfile)  # type: ignore[misc]


def extract_tar(
    archive: Path,
    dest: Path,
    *,
    caps: ExtractCaps = NO_CAPS,
    reserved: frozenset[str] = frozenset(),
    stop: threading.Event | None = None,
) -> list[FileEntry]:
    """Extract archive (tar, tar.gz, tar.bz2, tar.xz) into the existing empty dir dest; return regular files.
    Anything unsafe or over a cap is UnsafeArchive; `stop` set makes it raise ExtractionStopped soon.

    Every header is checked before anything is written, so an archive over a cap or with a hostile name costs
    no file at all (100,000 entries are refused at the 20,001st header, not after 20,000 files). A compressed
    archive is decompressed twice for that: once for its headers, once for its contents."""
    run = _Extraction(dest, caps, reserved, stop or threading.Event())
    with tarfile.open(archive, "r:*", tarinfo=_CheckedInfo) as tf:
        names = [run.check(member) for member in tf]
        for member, rel in zip(tf.getmembers(), names, strict=True):
            if rel is not None:
                run.create(tf, member, rel)
    _check_links_resolve_inside(dest, run.links)
    return run.entries


@dataclass
class _Extraction:
    """One extraction's state: headers counted against the caps, then what was written."""

    dest: Path
    caps: ExtractCaps
    reserved: frozenset[str]
    stop: threading.Event
    entries: list[FileEntry] = field(default_factory=list)
    links: list[tuple[str, Path]] = field(default_factory=list)
    total: int = 0  # bytes the headers announce
    written: int = 0
    count: int = 0

    def check(self, member: tarfile.TarInfo) -> str | None:
        """Check one header against the caps and the rules that need no filesystem; its relative path."""
        self._stop_point()
        self.count += 1
        if self.count > self.caps.max_entries:
            raise UnsafeArchive(
                f"archive has more than {self.caps.max_entries} entries (GPUD_MODEL_ARCHIVE_MAX_ENTRIES)"
            )
        rel = _safe_name(member.name, self.reserved, self.caps)
        if rel is None:
            return None
        # The longest relative path the kernel takes below dest.
        if len(rel.encode(errors="surrogateescape")) >= PATH_MAX - len(os.fsencode(self.dest)) - 1:
            raise UnsafeArchive(f"archive entry {rel[:200]!r}... is too long a path for the cache directory")
        if member.isreg():
            self.total += member.size
            if self.caps.max_bytes is not None and self.total > self.caps.max_bytes:
                raise UnsafeArchive(
                    f"archive unpacks to more than the limit of {self.caps.max_bytes} bytes ({self.caps.bytes_why})"
                )
        elif member.issym():
            _check_symlink(rel, member.linkname, self.caps.max_path)
        elif member.islnk():
            _safe_name(member.linkname, self.reserved, self.caps)
        elif not member.isdir():
            raise UnsafeArchive(f"archive entry {member.name!r} is a device, fifo or other special file")
        return rel

    def create(self, tf: tarfile.TarFile, member: tarfile.TarInfo, rel: str) -> None:
        """Create one checked member below dest, its parents first."""
        self._stop_point()
        _make_parents(self.dest, rel)
        target = self.dest / rel
        if member.isreg():
            budget = None if self.caps.max_bytes is None else self.caps.max_bytes - self.written
            entry = _write_file(tf, member, rel, target, budget, self.stop)
            self.written += entry.size
            self.entries.append(entry)
        elif member.isdir():
            if os.path.lexists(target):
                if not stat.S_ISDIR(os.lstat(target).st_mode):
                    raise UnsafeArchive(f"archive entry {member.name!r} replaces a non-directory")
            else:
                os.mkdir(target, 0o755)
        elif member.issym():
            os.symlink(member.linkname, target)
            self.links.append((rel, target))
        else:  # a hard link: check() let nothing else through
            _hardlink(self.dest, rel, member, self.reserved, self.caps)

    def _stop_point(self) -> None:
        if self.stop.is_set():
            raise ExtractionStopped()


def _check_links_resolve_inside(dest: Path, links: list[tuple[str, Path]]) -> None:
    """A chain of individually harmless links can still climb out; resolve each one for real."""
    root = os.path.realpath(dest)
    for rel, target in links:
        resolved = os.path.realpath(target)
        if resolved != root and not resolved.startswith(root + os.sep):
            raise UnsafeArchive(f"symlink {rel!r} resolves outside the model")


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under root, deepest first (links are not followed)."""
    for dirpath, _dirnames, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """fsync one directory so a rename or new entry in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
