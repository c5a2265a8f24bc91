"""Listening sockets: the admin Unix socket (mode 0660, group, stale-file handling) and the public TCP socket.

The admin socket's directory must be one no other user can change: whoever may create or rename entries in it
(or in a directory above it) could put a fake daemon where gpuctl looks. gpud creates missing directories itself
(0755, or 0750 with the admin group) and refuses to start when the directory, or one above it, is owned by
another user than root or gpud's, or is writable by group or others (a sticky directory such as /tmp is fine
above the socket's own directory, never as that directory).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ADMIN_SOCKET_MODE = 0o660


class AlreadyRunning(Exception):
    """Another live daemon answers on the admin socket."""


class UnsafeSocketDirectory(Exception):
    """The admin socket's directory, or one above it, could be changed by another user."""


@dataclass(frozen=True)
class UnixListener:
    """A bound admin socket and the inode of its file, to remove only our own file at shutdown."""

    path: Path
    sock: socket.socket
    inode: int

    def remove_file(self) -> None:
        """Unlink the socket file unless another process has replaced it since."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()


def bind_admin_socket(path: Path, group: str | None) -> UnixListener:
    """Create, bind and listen on the admin socket; replace a stale file, refuse if a daemon is live there."""
    _make_dirs(path.parent, group)
    problem = unsafe_directory(path.parent, os.geteuid())
    if problem:
        raise UnsafeSocketDirectory(
            f"refusing to put the admin socket {path} there: {problem}; use a directory only root or uid "
            f"{os.geteuid()} can write to (e.g. /run/gpud), or set GPUD_ADMIN_SOCKET"
        )
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a umask that already gives 0660, so the socket is never briefly wider than that.
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, ADMIN_SOCKET_MODE)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(128)
    sock.setblocking(False)
    return UnixListener(path, sock, os.stat(path).st_ino)


def passed_socket_group(sock: socket.socket) -> int | None:
    """The group that owns a socket file systemd passed (SocketGroup=), when its mode lets that group connect.

    Whoever set up the socket unit chose who may connect; gpud admits the same group, so SocketGroup= alone is enough
    and admin_socket_group need not repeat it.
    """
    path = sock.getsockname()
    if not isinstance(path, str) or not path or path.startswith("\0"):
        return None  # unnamed or abstract: no file, so no group
    try:
        info = os.stat(path)
    except OSError as exc:
        logger.warning("cannot read the passed admin socket %s (%s); admitting root only", path, exc.strerror)
        return None
    if not info.st_mode & stat.S_IWGRP:
        return None
    return info.st_gid


def _make_dirs(directory: Path, group: str | None) -> None:
    """Create the missing directories down to `directory`: 0755, or 0750 owned by the admin group."""
    mode = 0o750 if group else 0o755
    gid = grp.getgrnam(group).gr_gid if group else -1
    for missing in [d for d in (directory, *directory.parents) if not d.exists()][::-1]:
        try:
            missing.mkdir(mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: the safety check below decides about it
        os.chmod(missing, mode)  # mkdir's mode is narrowed by the umask; the check wants exactly this
        os.chown(missing, -1, gid)


def unsafe_directory(directory: Path, uid: int) -> str | None:
    """Why another user could swap entries in `directory` (or a directory above it, or a link on the way), or None.

    Allowed owners are root and `uid`. The directory itself must not be writable by group or others; a directory
    above it may be if it is sticky (like /tmp: others cannot rename what they do not own there).
    """
    real = Path(os.path.realpath(directory))
    lexical = Path(os.path.abspath(directory))
    for chain, follow in ((lexical, False), (real, True)):
        for depth, entry in enumerate((chain, *chain.parents)):
            try:
                info = os.stat(entry) if follow else os.lstat(entry)
            except OSError as exc:
                return f"cannot check {entry}: {exc.strerror}"
            if info.st_uid not in (0, uid):
                return f"{entry} is owned by uid {info.st_uid}, not by root or uid {uid}"
            if stat.S_ISLNK(info.st_mode):
                continue  # a link's own mode means nothing; its directory and its target are checked
            open_to = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if open_to and (depth == 0 or not info.st_mode & stat.S_ISVTX):
                who = "others" if info.st_mode & stat.S_IWOTH else "its group"
                return f"{entry} is writable by {who} (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _clear_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AlreadyRunning(f"{path} exists and is not a socket; remove it or choose another GPUD_ADMIN_SOCKET")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        logger.info("replacing stale admin socket %s (left by a process that is gone)", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise AlreadyRunning(f"another gpud is already listening on {path}")


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port (IPv4 or IPv6)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock
