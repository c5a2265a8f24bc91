"""Where a worker channel listens: the per-session directory and its `worker.sock`, made fresh or made again in
place for a running worker gpud adopts after its own restart."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from gpud.worker.protocol import SOCKET_NAME

# Socket and directory modes: both belong to the worker's own uid (one per session), which alone may connect();
# any other uid is refused by the filesystem, and, should the modes be opened up, by the SO_PEERCRED check.
# See docs/worker-protocol.md, Security.
SOCKET_MODE = 0o600
DIR_MODE = 0o700
_STAGING_PREFIX = ".adopt-"  # a root-only directory next to the session's, short enough for AF_UNIX paths


class SocketDirUnusable(OSError):
    """The existing socket directory cannot be adopted (gone, not a directory, or not the worker's)."""


def _bind(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))  # bind() never follows a link at the path: anything there is EADDRINUSE
    except BaseException:
        sock.close()
        raise
    return sock


def _hand_over(path: Path, uid: int, gid: int) -> None:
    os.chmod(path, SOCKET_MODE)
    if (uid, gid) != (os.geteuid(), os.getegid()):
        os.chown(path, uid, gid, follow_symlinks=False)


def bind_fresh(socket_dir: Path, uid: int, gid: int) -> socket.socket:
    """A new directory (anything at its path is removed first) with a bound socket, both handed to uid:gid."""
    # The directory stays root's until the socket is ready: nothing a previous holder of this path (a restarted
    # session) left survives, and nobody can swap the socket for a link before it is chowned.
    shutil.rmtree(socket_dir, ignore_errors=True)
    socket_dir.mkdir(parents=True, mode=DIR_MODE)
    os.chmod(socket_dir, DIR_MODE)
    sock = _bind(socket_dir / SOCKET_NAME)
    try:
        _hand_over(socket_dir / SOCKET_NAME, uid, gid)
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(socket_dir, uid, gid)  # last: from now on the worker's uid may enter
    except BaseException:
        sock.close()
        raise
    return sock


def bind_adopted(socket_dir: Path, uid: int, gid: int) -> socket.socket:
    """A new socket at `<socket_dir>/worker.sock` in the EXISTING directory, handed to uid:gid.

    The worker's container has that directory bind-mounted, so it must stay the same inode; and it belongs to the
    worker's uid, which may have put anything in it (a link to a host file, a hard link to someone's socket, a
    directory). So nothing is done at that path but one rename(): the socket is bound, chmodded and chowned in a
    root-only staging directory next to it (the same filesystem), then renamed over whatever `worker.sock` is,
    which replaces that entry itself and follows nothing."""
    dir_fd = _open_worker_dir(socket_dir, uid)
    try:
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=socket_dir.parent))
        try:
            staged = staging / SOCKET_NAME
            sock = _bind(staged)
            try:
                _hand_over(staged, uid, gid)
                _rename_into(staged, dir_fd)
            except BaseException:
                sock.close()
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(dir_fd)
    return sock


def _open_worker_dir(socket_dir: Path, uid: int) -> int:
    """The session directory, opened without following a link; it must be a directory owned by the worker."""
    try:
        fd = os.open(socket_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SocketDirUnusable(errno.ENOENT, "the worker's socket directory is gone", str(socket_dir)) from None
    except OSError as exc:  # ELOOP (a link) or ENOTDIR
        raise SocketDirUnusable(exc.errno, f"not a directory: {exc.strerror}", str(socket_dir)) from None
    owner = os.fstat(fd).st_uid
    if owner != uid:
        os.close(fd)
        # The worker (uid) could not enter a 0700 directory of another owner: adopting it could not work.
        raise SocketDirUnusable(errno.EPERM, f"owned by uid {owner}, not the worker's uid {uid}", str(socket_dir))
    return fd


def _rename_into(staged: Path, dir_fd: int) -> None:
    try:
        os.rename(staged, SOCKET_NAME, dst_dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise
        # The worker made `worker.sock` a directory: remove it (rmtree works on descriptors and does not follow
        # links inside), then the rename goes through.
        with contextlib.suppress(FileNotFoundError):
            _remove_entry(dir_fd)
        os.rename(staged, SOCKET_NAME, dst_dir_fd=dir_fd)


def _remove_entry(dir_fd: int) -> None:
    info = os.stat(SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(SOCKET_NAME, dir_fd=dir_fd)
    else:
        os.unlink(SOCKET_NAME, dir_fd=dir_fd)
