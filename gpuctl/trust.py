"""Whether an admin socket can be trusted: a socket in a directory another user controls may be a fake daemon.

The `gpud run --dev` socket falls back to /tmp/gpud-<uid>/gpud/gpud.sock: an unprivileged user could create that
directory first and listen there, and gpuctl would send them its commands (and show their answers). So before
connecting, gpuctl checks that the socket and every directory above it (and every link on the way) is owned by
root or the current user, that the socket's own directory is not writable by group or others, and that any
directory above it that is, is sticky (like /tmp). gpud refuses to create its socket anywhere else, too.

Standard library only: gpuctl's start-up stays small.
"""

from __future__ import annotations

import os
import stat


def _entry_problem(entry: str, info: os.stat_result, uid: int, parent_of_socket: bool) -> str | None:
    if info.st_uid not in (0, uid):
        return f"{entry} is owned by uid {info.st_uid}, not by root or you (uid {uid})"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return None  # a link's mode means nothing (its directory and target are checked); the socket's neither
    open_to = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if open_to and (parent_of_socket or not info.st_mode & stat.S_ISVTX):
        who = "others" if info.st_mode & stat.S_IWOTH else "its group"
        return f"{entry} is writable by {who} (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _chain(path: str) -> list[str]:
    """`path` and every directory above it, nearest first."""
    entries = [path]
    while (parent := os.path.dirname(entries[-1])) != entries[-1]:
        entries.append(parent)
    return entries


def untrusted_reason(socket_path: str, uid: int | None = None) -> str | None:
    """Why the socket at `socket_path` could be another user's, or None when it is safe to talk to.

    A missing socket (or directory) is not judged here: connecting will fail with "no daemon".
    """
    uid = os.geteuid() if uid is None else uid
    lexical = os.path.abspath(socket_path)
    real = os.path.realpath(socket_path)
    for chain, look in ((lexical, os.lstat), (real, os.stat)):
        for depth, entry in enumerate(_chain(chain)):
            try:
                info = look(entry)
            except (FileNotFoundError, PermissionError):
                continue  # connecting fails the same way, with its own message (no daemon, permission denied)
            except OSError as exc:
                return f"cannot check {entry}: {exc.strerror}"
            if problem := _entry_problem(entry, info, uid, parent_of_socket=depth == 1):
                return problem
    return None
