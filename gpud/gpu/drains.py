"""GPU drains that outlive gpud: `<state_dir>/gpu-drains.json`, rewritten atomically on every drain change.

An operator's drain and an auto-drain for a hardware fault (`xid 79`) must still hold after a restart, a kill -9 or
an upgrade, until `gpuctl gpu undrain`. Each drain is keyed by the GPU's UUID, so it follows the GPU when its index
changes; a GPU without a UUID is keyed by its index. The file is only ever written by gpud (root-owned state dir,
mode 0600); a file that is not a small regular file owned by gpud's user, or that does not parse, is ignored with a
warning: gpud still starts, without those drains.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpud.gpu.inventory import Gpu, GpuInventory
from gpud.gpu.scheduler import Drain, Scheduler

logger = logging.getLogger(__name__)

DRAINS_FILE = "gpu-drains.json"
FORMAT_VERSION = 1
# A few hundred bytes per GPU: anything near this is not ours.
MAX_FILE_BYTES = 64 * 1024
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class SavedDrain:
    """One drain as kept on disk: the GPU's UUID ("" when NVML gave none) and index, why, and whether unhealthy."""

    uuid: str
    index: int
    reason: str
    unhealthy: bool

    @classmethod
    def of(cls, drain: Drain) -> SavedDrain:
        """The saved form of a drain in force."""
        return cls(drain.gpu.uuid, drain.gpu.index, drain.reason, drain.unhealthy)

    def matches(self, gpu: Gpu) -> bool:
        """Whether this is the drain of `gpu`: same UUID, or same index when neither has a UUID."""
        return gpu.uuid == self.uuid if self.uuid else not gpu.uuid and gpu.index == self.index


class DrainFile:
    """The drains file in a state directory: read once at start, replaced whole on each change."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DRAINS_FILE
        # Saved drains of GPUs with a UUID that are not on the host now (a GPU that fell off the bus may come back
        # after a reset): written again with every save, so such a GPU returns still drained.
        self.absent: list[SavedDrain] = []

    def read(self) -> list[SavedDrain]:
        """The saved drains; none when there is no file, and none (with a warning) when it cannot be trusted."""
        try:
            return _parse(self._read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
            logger.warning(
                "ignoring the saved GPU drains in %s: %s (GPUs drained before the restart take work until drained "
                "again; the file is replaced at the next drain or undrain)",
                self.path,
                exc,
            )
            return []

    def _read_text(self) -> str:
        # O_NOFOLLOW: a symlink is refused, never followed; O_NONBLOCK: a FIFO planted here cannot hang the start.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValueError("a symbolic link (not followed)") from exc
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            if info.st_uid != os.geteuid():
                raise ValueError(f"owned by uid {info.st_uid}, not gpud's uid {os.geteuid()}")
            if info.st_mode & 0o022:
                raise ValueError(f"writable by others (mode {stat.S_IMODE(info.st_mode):04o})")
            raw = b""
            while len(raw) <= MAX_FILE_BYTES and (chunk := os.read(fd, MAX_FILE_BYTES + 1 - len(raw))):
                raw += chunk
        finally:
            os.close(fd)
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        return raw.decode("utf-8")

    def write(self, drains: list[SavedDrain]) -> None:
        """Replace the file atomically: a new 0600 file in the same directory, fsynced, renamed over the old one
        (a symlink there is replaced, not written through), then the directory fsynced. Raises OSError."""
        document = {"version": FORMAT_VERSION, "drains": [_entry(drain) for drain in drains]}
        data = (json.dumps(document, indent=1) + "\n").encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{DRAINS_FILE}.", suffix=".tmp", dir=self.path.parent)  # 0600
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def save(self, drains: list[Drain]) -> None:
        """The scheduler's drain observer: write the drains in force; a failure is logged, not raised (the drain
        holds in this process, and an admin request must not fail for it)."""
        try:
            self.write([SavedDrain.of(drain) for drain in drains] + self.absent)
        except OSError as exc:
            logger.error("GPU drains not saved to %s (%s): they hold now, but not after a restart", self.path, exc)

    def remove_leftovers(self) -> None:
        """Delete temporary files a crash left between creating one and renaming it."""
        for leftover in self.path.parent.glob(f".{DRAINS_FILE}.*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()


def restore_drains(drain_file: DrainFile, inventory: GpuInventory, scheduler: Scheduler) -> None:
    """Apply the saved drains to the GPUs present (by UUID), keep those of GPUs absent now, then save on every
    change.

    Run before anything is leased. An auto-drain is applied as unhealthy again (a GPU already found unhealthy at
    start keeps its fresh reason); it does not count in gpud_gpu_auto_drains_total, which counts faults seen. The
    drain of a GPU not on the host now stays in the file until that GPU is back and undrained (a GPU that fell off
    the bus must not return healthy after a reset); one keyed by index only cannot be told apart later: dropped.
    """
    drain_file.remove_leftovers()
    saved = drain_file.read()
    for drain in saved:
        gpu = next((gpu for gpu in inventory.gpus if drain.matches(gpu)), None)
        if gpu is None:
            kept = bool(drain.uuid)
            if kept:
                drain_file.absent.append(drain)
            logger.info(
                "%s the saved drain of GPU %s (index %d then; %s): no such GPU on this host now%s",
                "keeping" if kept else "dropping",
                drain.uuid or "without UUID",
                drain.index,
                drain.reason,
                " (it applies again when the GPU is back)" if kept else "",
            )
            continue
        if drain.unhealthy and scheduler.is_healthy(gpu.index):
            scheduler.mark_unhealthy(gpu.index, drain.reason)
        elif not drain.unhealthy:
            scheduler.drain(gpu.index, drain.reason)
        moved = f" (index {drain.index} before)" if gpu.index != drain.index else ""
        logger.info(
            "GPU %d (%s)%s stays drained from before the restart: %s%s",
            gpu.index,
            gpu.uuid or "no UUID",
            moved,
            scheduler.drain_reason(gpu.index),
            ", unhealthy" if not scheduler.is_healthy(gpu.index) else "",
        )
    now = [SavedDrain.of(drain) for drain in scheduler.drains()] + drain_file.absent
    if now != saved:  # a GPU moved, or drained by the first health check: the file says so at once
        drain_file.save(scheduler.drains())
    scheduler.watch_drains(drain_file.save)


def _entry(drain: SavedDrain) -> dict[str, Any]:
    return {"uuid": drain.uuid, "index": drain.index, "reason": drain.reason, "unhealthy": drain.unhealthy}


def _parse(text: str) -> list[SavedDrain]:
    """The drains in the file's text; ValueError naming what is wrong."""
    document = json.loads(text)
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise ValueError(f"not a version {FORMAT_VERSION} drains document")
    entries = document.get("drains")
    if not isinstance(entries, list):
        raise ValueError("`drains` is not a list")
    return [_drain(entry, number) for number, entry in enumerate(entries)]


def _drain(entry: Any, number: int) -> SavedDrain:
    if not isinstance(entry, dict):
        raise ValueError(f"drain {number} is not an object")
    uuid, index, reason, unhealthy = (entry.get(k) for k in ("uuid", "index", "reason", "unhealthy"))
    if not isinstance(uuid, str) or len(uuid) > MAX_REASON_CHARS or not uuid.isprintable():
        raise ValueError(f"drain {number}: bad uuid")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 4096:
        raise ValueError(f"drain {number}: bad index")
    if not isinstance(reason, str) or not reason or len(reason) > MAX_REASON_CHARS or not reason.isprintable():
        raise ValueError(f"drain {number}: bad reason")
    if not isinstance(unhealthy, bool):
        raise ValueError(f"drain {number}: bad unhealthy flag")
    return SavedDrain(uuid, index, reason, unhealthy)
