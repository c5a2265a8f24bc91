"""systemd integration: readiness/status/watchdog notifications (sdnotify) and socket activation (LISTEN_FDS).

Everything here is a no-op outside systemd, so `gpud run` in a terminal behaves the same minus the messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

import sdnotify

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET when systemd gave one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(address)
        self._notifier: sdnotify.SystemdNotifier | None = None
        if self.enabled:
            # sdnotify sends the messages; the socket is ours, connected to the address in *this* environment and
            # non-blocking, so a full datagram queue (nobody reading) drops a message instead of blocking the loop.
            # Send errors are ignored, as systemd's own sd_notify does: a lost status line must never stop gpud.
            self._notifier = sdnotify.SystemdNotifier()
            if self._notifier.socket is not None:
                self._notifier.socket.close()  # the one it opened from os.environ
            self._notifier.socket = _connect(address)
        self.watchdog_interval = _watchdog_interval(environ)

    def send(self, *lines: str) -> None:
        """Send one datagram with the given KEY=VALUE lines."""
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        """Tell systemd start-up is complete (Type=notify)."""
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Update the one-line status `systemctl status` shows."""
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        """Tell systemd a reload started (MONOTONIC_USEC is required by Type=notify-reload)."""
        usec = int(_monotonic_usec())
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        """Tell systemd shutdown started."""
        self.send("STOPPING=1", "STATUS=stopping")

    async def watchdog_forever(self) -> None:
        """Ping the watchdog from the event loop: if the loop stalls, the pings stop and systemd acts."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)


def _connect(address: str) -> socket.socket | None:
    """A non-blocking datagram socket connected to NOTIFY_SOCKET (`@name` is an abstract socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect("\0" + address[1:] if address.startswith("@") else address)
    except OSError as exc:
        logger.warning("cannot reach NOTIFY_SOCKET %s: %s", address, exc)
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def _monotonic_usec() -> float:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares RELOADING=1 against."""
    return time.monotonic() * 1e6


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2 / 1e6, 0.01)
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None


def listen_sockets(environ: Mapping[str, str] | None = None) -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, by name (LISTEN_FDNAMES, else "fd3", "fd4", ...)."""
    environ = os.environ if environ is None else environ
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    found = {}
    for offset in range(count):
        fd = SD_LISTEN_FDS_START + offset
        name = names[offset] if offset < len(names) and names[offset] else f"fd{fd}"
        os.set_inheritable(fd, False)
        found[name] = socket.socket(fileno=fd)
    # Children (worker processes) must not see them: systemd's sd_listen_fds(unset_environment=1) does the same.
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return found
