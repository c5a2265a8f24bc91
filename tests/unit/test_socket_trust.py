"""Who could swap the admin socket: gpud's check of its directory and gpuctl's check of the socket, on real paths."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpuctl.trust import untrusted_reason
from gpud.daemon.listeners import unsafe_directory

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A safe directory to build cases in (pytest's tmp path: root-owned, not writable by others)."""
    return tmp_path


@pytest.fixture
def listening() -> Iterator[Callable[[Path], Path]]:
    """Bind a Unix socket at a path (gpuctl looks at a real socket file)."""
    socks: list[socket.socket] = []

    def bind(path: Path) -> Path:
        if path.exists():
            return path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        socks.append(sock)
        return path

    yield bind
    for sock in socks:
        sock.close()


def _both(directory: Path, bind: Callable[[Path], Path]) -> tuple[str | None, str | None]:
    """(gpud's verdict on the directory, gpuctl's on a socket in it)."""
    return unsafe_directory(directory, os.geteuid()), untrusted_reason(str(bind(directory / "gpud.sock")))


def test_a_private_directory_is_fine(base: Path, listening: Callable[[Path], Path]) -> None:
    (base / "run").mkdir(mode=0o755)
    assert _both(base / "run", listening) == (None, None)


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775, 0o757])
def test_a_directory_others_can_write_is_refused(base: Path, listening: Callable[[Path], Path], mode: int) -> None:
    directory = base / "run"
    directory.mkdir()
    directory.chmod(mode)
    gpud, gpuctl = _both(directory, listening)
    assert gpud and gpuctl and f"{directory} is writable by" in gpud and f"{directory} is writable by" in gpuctl


def test_a_sticky_directory_above_is_fine_not_one_writable_without_sticky(
    base: Path, listening: Callable[[Path], Path]
) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    (shared / "mine").mkdir(mode=0o755)
    assert _both(shared / "mine", listening) == (None, None)
    shared.chmod(0o777)  # others may rename "mine" away and put their own in its place
    gpud, gpuctl = _both(shared / "mine", listening)
    assert gpud and gpuctl and "is writable by others (mode 0777)" in gpud


@needs_root
def test_owned_by_another_user_is_refused(base: Path, listening: Callable[[Path], Path]) -> None:
    theirs = base / "theirs"
    (theirs / "gpud").mkdir(parents=True, mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)  # they own a directory above: they can rename ours away
    gpud, gpuctl = _both(theirs / "gpud", listening)
    assert gpud and gpuctl and f"{theirs} is owned by uid {NOBODY}" in gpud


@needs_root
def test_a_socket_or_link_of_another_user_is_refused(base: Path, listening: Callable[[Path], Path]) -> None:
    path = listening(base / "gpud.sock")
    assert untrusted_reason(str(path)) is None
    os.chown(path, NOBODY, NOBODY)
    assert f"{path} is owned by uid {NOBODY}" in (untrusted_reason(str(path)) or "")
    os.chown(path, 0, 0)
    link = base / "link.sock"
    link.symlink_to(path)
    assert untrusted_reason(str(link)) is None
    os.lchown(link, NOBODY, NOBODY)  # they could point it elsewhere
    assert f"{link} is owned by uid {NOBODY}" in (untrusted_reason(str(link)) or "")


def test_the_target_of_a_link_is_checked_too(base: Path, listening: Callable[[Path], Path]) -> None:
    open_dir = base / "open"
    open_dir.mkdir()
    target = listening(open_dir / "gpud.sock")
    open_dir.chmod(0o777)
    (base / "link.sock").symlink_to(target)
    assert f"{open_dir} is writable by others" in (untrusted_reason(str(base / "link.sock")) or "")


def test_a_missing_socket_is_left_to_connect(base: Path) -> None:
    assert untrusted_reason(str(base / "nothing-here.sock")) is None
