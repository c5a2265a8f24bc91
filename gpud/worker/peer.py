"""Who connected to a worker socket: the kernel's word (SO_PEERCRED), not the worker's."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

_PEERCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


@dataclass(frozen=True, slots=True)
class Peer:
    """The connecting process's credentials as recorded at connect() (in gpud's own namespaces)."""

    pid: int
    uid: int
    gid: int


def peer_of(writer: asyncio.StreamWriter) -> Peer | None:
    """The peer of a Unix stream connection, or None when the kernel cannot tell."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        return Peer(*_PEERCRED.unpack(raw))
    except (OSError, struct.error):
        return None
