"""Who is on the other end of the admin Unix socket (SO_PEERCRED), and whether they may be."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from aiohttp import web

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class PeerCredentials:
    """The kernel's record of the connecting process."""

    pid: int
    uid: int
    gid: int


def peer_credentials(request: web.Request) -> PeerCredentials | None:
    """The credentials of the request's peer, or None when the transport is not a Unix socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCredentials(pid, uid, gid)


class PeerPolicy:
    """Admits root, the daemon's own user, and members (primary or supplementary) of the socket's group."""

    def __init__(self, group: str | None = None, *, gid: int | None = None) -> None:
        self._gid = grp.getgrnam(group).gr_gid if group else gid

    @property
    def gid(self) -> int | None:
        """The group whose members are admitted, if any."""
        return self._gid

    def admits(self, peer: PeerCredentials) -> bool:
        """Whether this peer may use the admin API."""
        if peer.uid in (0, os.getuid()):
            return True
        if self._gid is None:
            return False
        return peer.gid == self._gid or self._gid in _supplementary_groups(peer.uid)


def _supplementary_groups(uid: int) -> set[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(user.pw_name, user.pw_gid))
