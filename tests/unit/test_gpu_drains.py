"""Drains kept across restarts (gpud/gpu/drains.py): the atomic file, what a restart applies from it (by UUID, else
by index), what it drops, and files it must not trust (corrupt, a symlink, a FIFO, huge, someone else's)."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gpud.gpu.drains import DRAINS_FILE, MAX_FILE_BYTES, DrainFile, SavedDrain, restore_drains
from gpud.gpu.inventory import Gpu, GpuInventory
from gpud.gpu.scheduler import Drain, Scheduler


def inventory(*gpus: tuple[int, str]) -> GpuInventory:
    """GPUs (index, uuid; "" for none), all tagged low."""
    return GpuInventory([Gpu(index, uuid, "H100", "low", True) for index, uuid in gpus], backend="nvml")


def started(state: Path, *gpus: tuple[int, str]) -> Scheduler:
    """What a gpud start does with the drains: a new scheduler, the saved drains applied to it."""
    gpus_now = inventory(*gpus)
    scheduler = Scheduler(gpus_now)
    restore_drains(DrainFile(state), gpus_now, scheduler)
    return scheduler


def saved(state: Path) -> dict[str, Any]:
    """The drains file's document."""
    return dict(json.loads((state / DRAINS_FILE).read_text()))


def write_raw(state: Path, data: bytes | str) -> Path:
    path = state / DRAINS_FILE
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)
    return path


GPUS = ((0, "GPU-aaaa"), (1, "GPU-bbbb"), (2, "GPU-cccc"))


# ---- the file -----------------------------------------------------------------------------------------------------


def test_write_is_atomic_0600_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    file = DrainFile(tmp_path)
    drains = [SavedDrain("GPU-aaaa", 0, "operator", False), SavedDrain("GPU-cccc", 2, "xid 79", True)]
    file.write(drains)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DRAINS_FILE]
    assert stat.S_IMODE((tmp_path / DRAINS_FILE).stat().st_mode) == 0o600
    assert file.read() == drains
    file.write([])
    assert file.read() == [] and sorted(p.name for p in tmp_path.iterdir()) == [DRAINS_FILE]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    file = DrainFile(tmp_path)
    file.write([SavedDrain("GPU-aaaa", 0, "operator", False)])
    (tmp_path / "blocker").mkdir()
    broken = DrainFile(tmp_path)
    broken.path = tmp_path / "blocker"  # os.replace of a file over a directory fails after the temp file is written
    with pytest.raises(OSError):
        broken.write([SavedDrain("GPU-bbbb", 1, "operator", False)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", DRAINS_FILE]
    assert file.read() == [SavedDrain("GPU-aaaa", 0, "operator", False)]


def test_save_logs_a_failure_instead_of_raising(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = DrainFile(tmp_path / "gone")  # no such directory: the temporary file cannot be made
    gpu = Gpu(0, "GPU-aaaa", "H100", "low", True)
    with caplog.at_level(logging.ERROR, logger="gpud.gpu.drains"):
        file.save([Drain(gpu, "operator", False)])
    assert f"GPU drains not saved to {file.path}" in caplog.text


def test_writing_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / DRAINS_FILE).symlink_to(target)
    DrainFile(tmp_path / "state").write([SavedDrain("GPU-aaaa", 0, "operator", False)])
    assert target.read_text() == "precious\n"
    assert not (tmp_path / "state" / DRAINS_FILE).is_symlink()


# ---- a restart ----------------------------------------------------------------------------------------------------


def test_drains_and_auto_drains_survive_a_restart_until_undrained(tmp_path: Path) -> None:
    before = started(tmp_path, *GPUS)
    assert not (tmp_path / DRAINS_FILE).exists()  # nothing drained, nothing written
    before.drain(1)
    before.mark_unhealthy(2, "xid 79")
    assert saved(tmp_path)["drains"] == [
        {"uuid": "GPU-bbbb", "index": 1, "reason": "operator", "unhealthy": False},
        {"uuid": "GPU-cccc", "index": 2, "reason": "xid 79", "unhealthy": True},
    ]
    after = started(tmp_path, *GPUS)
    assert (after.drain_reason(1), after.is_healthy(1)) == ("operator", True)
    assert (after.drain_reason(2), after.is_healthy(2)) == ("xid 79", False)
    assert after.drain_reason(0) is None
    assert [gpu.index for gpu in after.eligible("low")] == [0]
    after.undrain(2)
    again = started(tmp_path, *GPUS)
    assert again.is_healthy(2) and not again.is_drained(2) and again.is_drained(1)


def test_only_real_changes_are_told() -> None:
    scheduler = Scheduler(inventory(*GPUS))
    told: list[list[Drain]] = []
    scheduler.watch_drains(told.append)
    scheduler.drain(0)
    scheduler.drain(0)  # already drained for the same reason
    scheduler.undrain(1)  # was not drained
    scheduler.mark_unhealthy(0, "xid 79")  # operator drain -> unhealthy: a change
    scheduler.drain(0)  # an unhealthy GPU keeps its reason: no change
    scheduler.acquire("low", "t1", "task")  # leasing never tells
    assert [[(d.gpu.index, d.reason, d.unhealthy) for d in drains] for drains in told] == [
        [(0, "operator", False)],
        [(0, "xid 79", True)],
    ]


def test_a_reload_that_retags_gpus_keeps_their_drains(tmp_path: Path) -> None:
    gpus_now = inventory(*GPUS)
    scheduler = Scheduler(gpus_now)
    restore_drains(DrainFile(tmp_path), gpus_now, scheduler)
    scheduler.mark_unhealthy(1, "xid 79")
    written = (tmp_path / DRAINS_FILE).stat().st_mtime_ns
    gpus_now.retag({1: "high"})  # what SIGHUP does with a new GPU_DEVICE_DIFFICULTY: same indexes and UUIDs
    assert [(d.gpu.index, d.gpu.difficulty, d.reason) for d in scheduler.drains()] == [(1, "high", "xid 79")]
    assert scheduler.eligible("high") == [] and not scheduler.is_healthy(1)
    assert (tmp_path / DRAINS_FILE).stat().st_mtime_ns == written  # no drain changed: nothing written
    assert started(tmp_path, *GPUS).drain_reason(1) == "xid 79"


def test_a_drain_follows_its_gpu_to_a_new_index(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    started(tmp_path, *GPUS).mark_unhealthy(2, "xid 79")
    # GPU 0 is gone (or hidden): the others are enumerated one lower.
    with caplog.at_level(logging.INFO, logger="gpud.gpu.drains"):
        after = started(tmp_path, (0, "GPU-bbbb"), (1, "GPU-cccc"))
    assert after.drain_reason(1) == "xid 79" and not after.is_healthy(1)
    assert not after.is_drained(0)
    assert "GPU 1 (GPU-cccc) (index 2 before) stays drained" in caplog.text
    assert saved(tmp_path)["drains"] == [{"uuid": "GPU-cccc", "index": 1, "reason": "xid 79", "unhealthy": True}]


def test_the_drain_of_a_gpu_gone_is_kept_until_it_returns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = started(tmp_path, *GPUS)
    before.mark_unhealthy(0, "xid 79")  # fell off the bus: after a reboot it may not enumerate at all
    before.drain(1)
    with caplog.at_level(logging.INFO, logger="gpud.gpu.drains"):
        after = started(tmp_path, (0, "GPU-bbbb"), (1, "GPU-dddd"))
    line = next(r for r in caplog.records if "keeping the saved drain of GPU GPU-aaaa" in r.getMessage())
    assert line.levelno == logging.INFO and "no such GPU on this host now" in line.getMessage()
    assert after.is_drained(0) and not after.is_drained(1)  # GPU-bbbb, now at 0; GPU-dddd is new
    after.undrain(0)  # a change while GPU-aaaa is away: its entry is written again with the others
    assert [d["uuid"] for d in saved(tmp_path)["drains"]] == ["GPU-aaaa"]
    back = started(tmp_path, *GPUS)  # reset, and it enumerates again: still drained, still unhealthy
    assert back.drain_reason(0) == "xid 79" and not back.is_healthy(0)
    back.undrain(0)
    assert saved(tmp_path)["drains"] == []


def test_gpus_without_uuid_are_matched_by_index(tmp_path: Path) -> None:
    before = started(tmp_path, (0, ""), (1, ""))
    before.drain(1)
    assert saved(tmp_path)["drains"] == [{"uuid": "", "index": 1, "reason": "operator", "unhealthy": False}]
    assert started(tmp_path, (0, ""), (1, "")).is_drained(1)
    # A GPU at that index that does have a UUID is not known to be the same GPU: not drained, entry dropped.
    assert not started(tmp_path, (0, ""), (1, "GPU-eeee")).is_drained(1)


def test_a_gpu_found_unhealthy_at_start_keeps_its_fresh_reason(tmp_path: Path) -> None:
    started(tmp_path, *GPUS).mark_unhealthy(0, "xid 79")
    gpus_now = inventory(*GPUS)
    scheduler = Scheduler(gpus_now)
    scheduler.mark_unhealthy(0, "ecc uncorrectable 3")  # the first health check, before the drains are restored
    restore_drains(DrainFile(tmp_path), gpus_now, scheduler)
    assert scheduler.drain_reason(0) == "ecc uncorrectable 3" and not scheduler.is_healthy(0)
    assert saved(tmp_path)["drains"] == [
        {"uuid": "GPU-aaaa", "index": 0, "reason": "ecc uncorrectable 3", "unhealthy": True}
    ]


def test_a_temporary_file_left_by_a_crash_is_removed_at_start(tmp_path: Path) -> None:
    leftover = tmp_path / f".{DRAINS_FILE}.x1y2z3.tmp"
    leftover.write_text("{")
    started(tmp_path, *GPUS)
    assert not leftover.exists()


# ---- files not to trust -------------------------------------------------------------------------------------------


GOOD = '{"uuid": "GPU-bbbb", "index": 1, "reason": "operator", "unhealthy": false}'


def entries(bad: str) -> bytes:
    """A document whose first drain is fine and second is not: all or nothing, so neither applies."""
    return ('{"version": 1, "drains": [' + GOOD + ", " + bad + "]}").encode()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "expecting property name"),
        (b"\xff\xfe garbage", "codec can't decode"),
        (b"", "expecting value"),
        (b'{"version": 2, "drains": []}', "not a version 1 drains document"),
        (b'{"version": 1, "drains": {}}', "`drains` is not a list"),
        (entries("7"), "drain 1 is not an object"),
        (entries('{"uuid": 5, "index": 0, "reason": "x", "unhealthy": false}'), "drain 1: bad uuid"),
        (entries('{"uuid": "GPU-aaaa", "index": true, "reason": "x", "unhealthy": false}'), "drain 1: bad index"),
        (entries('{"uuid": "GPU-aaaa", "index": -1, "reason": "x", "unhealthy": false}'), "drain 1: bad index"),
        (entries('{"uuid": "GPU-aaaa", "index": 0, "reason": "a\\nb", "unhealthy": false}'), "drain 1: bad reason"),
        (entries('{"uuid": "GPU-aaaa", "index": 0, "reason": "", "unhealthy": false}'), "drain 1: bad reason"),
        (entries('{"uuid": "GPU-aaaa", "index": 0, "reason": "x", "unhealthy": "yes"}'), "drain 1: bad unhealthy"),
        (b"[" * 10_000 + b"]" * 10_000, "recursion"),
    ],
)  # fmt: skip
def test_a_corrupt_file_is_a_warning_and_applies_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    write_raw(tmp_path, content)
    with caplog.at_level(logging.WARNING, logger="gpud.gpu.drains"):
        scheduler = started(tmp_path, *GPUS)
    assert scheduler.drains() == []
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert str(tmp_path / DRAINS_FILE) in warning.getMessage() and why in warning.getMessage().lower()


def test_a_corrupt_file_is_replaced_at_the_next_change(tmp_path: Path) -> None:
    write_raw(tmp_path, "{garbage")
    scheduler = started(tmp_path, *GPUS)
    assert (tmp_path / DRAINS_FILE).read_text() == "{garbage"  # left for the operator to look at until then
    scheduler.drain(2)
    assert saved(tmp_path)["drains"] == [{"uuid": "GPU-cccc", "index": 2, "reason": "operator", "unhealthy": False}]


def test_refused_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = json.dumps(
        {"version": 1, "drains": [{"uuid": "GPU-aaaa", "index": 0, "reason": "operator", "unhealthy": False}]}
    )
    path = tmp_path / DRAINS_FILE
    cases: list[tuple[str, str]] = []

    def refused(why: str) -> None:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gpud.gpu.drains"):
            result: list[list[SavedDrain]] = []
            reader = threading.Thread(target=lambda: result.append(DrainFile(tmp_path).read()), daemon=True)
            reader.start()
            reader.join(10)
            assert not reader.is_alive(), f"reading hung ({why})"  # a FIFO must not block the start
        assert result == [[]], why
        assert why in caplog.text, caplog.text
        cases.append((why, caplog.text))

    (tmp_path / "passwd").write_text(good)  # even a valid document is not read through a link
    path.symlink_to(tmp_path / "passwd")
    refused("a symbolic link (not followed)")
    path.unlink()
    path.symlink_to("/etc/passwd")
    refused("a symbolic link (not followed)")
    path.unlink()
    os.mkfifo(path, 0o600)
    refused("not a regular file")
    path.unlink()
    path.mkdir()
    refused("not a regular file")
    path.rmdir()
    write_raw(tmp_path, good)
    os.chown(path, 65534, 65534)
    refused(f"owned by uid 65534, not gpud's uid {os.geteuid()}")
    os.chown(path, os.geteuid(), os.getegid())
    path.chmod(0o622)
    refused("writable by others (mode 0622)")
    path.chmod(0o600)
    with path.open("wb") as file:
        file.truncate(1024 * 1024 * 1024)  # sparse: 1 GiB read would be the attack; only 64 KiB + 1 is read
    refused(f"larger than {MAX_FILE_BYTES} bytes")
    assert len(cases) == 7
