"""Listening sockets: the admin Unix socket (mode 0660, group, stale-file handling) and the public TCP socket."""

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
    path.parent.mkdir(parents=True, exist_ok=True)
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
