"""The daemon's file-descriptor budget, and event-loop errors logged without flooding the log.

Every connection costs a file descriptor. gpud raises its soft RLIMIT_NOFILE to the hard limit at start (as Go's
runtime and systemd-managed daemons do; the unit sets LimitNOFILE) and checks that both connection caps plus a
reserve for everything else (worker sockets, engine API connections, files, the journal) fit in it. If they do not,
the public cap is lowered to fit, with a warning, so that a flood on the public port can never take the fds the
admin socket and the workers need.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from dataclasses import dataclass
from typing import Any

from gpud.api.listener import RESOURCE_ERRNOS
from gpud.api.logthrottle import LogThrottle

logger = logging.getLogger(__name__)

# Descriptors kept for what is not a client connection: worker sockets and their connections, engine API
# connections, model files being fetched, the notify and journal sockets, Python's own.
FD_RESERVE = 256
# The smallest public cap gpud will run with when the fd limit is tiny.
MIN_PUBLIC_CAP = 8


@dataclass(frozen=True)
class ConnectionCaps:
    """How many connections each listener may hold, as fitted to the fd limit."""

    public: int
    admin: int
    fd_limit: int


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def fit_caps(public: int, admin: int, fd_limit: int, reserve: int = FD_RESERVE) -> ConnectionCaps:
    """The caps to use: as configured when public + admin + reserve fit in fd_limit, else a lower public cap."""
    if public + admin + reserve <= fd_limit:
        return ConnectionCaps(public, admin, fd_limit)
    fitted = max(MIN_PUBLIC_CAP, fd_limit - admin - reserve)
    logger.warning(
        "open-file limit %d leaves room for %d public connections, not GPUD_MAX_CONNECTIONS=%d (admin cap %d, "
        "%d kept for workers and files): using %d; raise LimitNOFILE (systemd) or `ulimit -n` to serve more",
        fd_limit, fitted, public, admin, reserve, fitted,
    )  # fmt: skip
    return ConnectionCaps(fitted, admin, fd_limit)


class LoopErrors:
    """An event-loop exception handler: out-of-descriptor errors (asyncio's own servers, e.g. the worker channels,
    report every failed accept()) as one throttled line, anything else to asyncio's default handler (traceback
    included) at most once per kind per interval."""

    def __init__(self, throttle: LogThrottle | None = None) -> None:
        self.throttle = throttle or LogThrottle(logger)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Handle one report from the loop."""
        exc = context.get("exception")
        message = str(context.get("message", "unhandled exception in the event loop"))
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            key = ("resource", exc.errno)
            if self.throttle.admit(key, f"'{message}' errors ({errno.errorcode.get(exc.errno, exc.errno)})"):
                logger.error("%s: %s; retrying every second (is the open-file limit too low?)", message, exc.strerror)
            return
        if self.throttle.admit((message, type(exc).__name__), f"'{message}' errors ({type(exc).__name__})"):
            loop.default_exception_handler(context)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become `loop`'s exception handler."""
        loop.set_exception_handler(self)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the loop back its default handler and report what is still held back."""
        loop.set_exception_handler(None)
        self.throttle.close()
