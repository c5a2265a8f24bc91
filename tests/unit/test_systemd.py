"""sd_notify over a real datagram socket, and socket activation's LISTEN_FDS parsing."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from gpud.daemon.systemd import Notifier, listen_sockets


def test_notifier_sends_lines_and_never_blocks_when_nobody_reads(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    notifier.ready("serving")
    assert reader.recv(4096) == b"READY=1\nSTATUS=serving"
    # Nobody reads from here on: the kernel queue fills; sends must be dropped, not block the caller.
    done = threading.Event()

    def flood() -> None:
        for _ in range(500):
            notifier.status("busy")
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(10), "a full notify queue blocked the sender"
    reader.close()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    assert Notifier({"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "2000000"}).watchdog_interval == 1.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval is None
    assert Notifier({}).watchdog_interval is None and not Notifier({}).enabled


def test_listen_sockets_ignores_fds_meant_for_another_process() -> None:
    assert listen_sockets({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}) == {}
    assert listen_sockets({}) == {}
