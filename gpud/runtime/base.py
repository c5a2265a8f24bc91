"""The container runtime interface: specs, results, errors, and the hardening every worker gets by default.

Hardening (all on unless a field of ContainerSpec says otherwise; both engines apply every item):

- network: ``none`` — a worker reaches nothing, not even the host's loopback; it talks to gpud only through
  the bind-mounted per-session socket directory.
- capabilities: all dropped; ``no-new-privileges`` so setuid binaries cannot regain any.
- root filesystem read-only, with a size-capped tmpfs at /tmp (``Limits.tmpfs_bytes``).
- pids limit (``Limits.pids``) so a fork bomb stops at the cgroup.
- memory limit (``Limits.memory_bytes``, default 16g) with memory+swap equal to it: no extra swap.
- CPU quota (``Limits.cpus`` times a 100 ms period) and a /dev/shm size (``Limits.shm_bytes``).
- the worker's own host uid:gid (given by gpud from GPUD_WORKER_UID_RANGE, one per session or one-off) unless
  the preset names root or a numeric uid; ``ContainerSpec.user``'s own default (65534) is for specs built by hand.
- the model directory mounted read-only at /models, with ``MODEL_PATH=/models``.
- labels ``gpud.managed=true`` plus task/session/GPU/model/preset ids and the worker's uid: the source of truth
  for finding gpud's containers (and the uids they hold) again after a restart; ``gpud.instance`` names the gpud
  that made it (added by gpud/runtime/instance.py).
"""

from __future__ import annotations

import enum
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from gpud.errors import GpudError, NotFound, Unavailable
from gpud.settings.presets import Limits

DEFAULT_USER = "65534:65534"
TMPFS_PATH = "/tmp"
MODELS_PATH = "/models"
CPU_PERIOD_US = 100_000
# Label keys: gpud finds its own containers by these (list-by-label), e.g. after a restart.
LABEL_MANAGED = "gpud.managed"
LABEL_TASK = "gpud.task_id"
LABEL_SESSION = "gpud.session_id"
LABEL_GPU = "gpud.gpu_uuid"
LABEL_MODEL = "gpud.model"
LABEL_PRESET = "gpud.preset"
LABEL_UID = "gpud.uid"
# Which gpud made the container (gpud/runtime/instance.py): instances sharing an engine never touch each other's.
LABEL_INSTANCE = "gpud.instance"

ProgressCallback = Callable[[str], Awaitable[None] | None]


class Stream(enum.Enum):
    """Which output stream a log line came from."""

    STDOUT = "stdout"
    STDERR = "stderr"


class ContainerState(enum.Enum):
    """A container's state, normalised across engines."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    REMOVING = "removing"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str) -> ContainerState:
        """Map an engine's state word (``running``, ``exited``, ``stopped``, ``dead`` ...) to a state."""
        value = value.lower()
        if value in {"stopped", "dead", "exited"}:
            return cls.EXITED
        if value in {"configured", "initialized", "created"}:
            return cls.CREATED
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class Capability(enum.Enum):
    """A guarantee a runtime can enforce; the contract tests consult these and skip (with a reason) otherwise."""

    NETWORK_NONE = "network_none"
    READ_ONLY_ROOTFS = "read_only_rootfs"
    READ_ONLY_MODELS = "read_only_models"
    MEMORY_LIMIT = "memory_limit"  # a worker past its memory limit is killed
    OOM_REPORT = "oom_report"  # ... and the engine reports that kill as oom_killed
    PIDS_LIMIT = "pids_limit"
    NON_ROOT_USER = "non_root_user"
    SURVIVES_RESTART = "survives_restart"  # containers outlive gpud and are found again by label
    IMAGES = "images"  # runs the spec's image (ensure_image checks and pulls it)
    # A container's output is kept while the engine's API does not answer (conmon writes Podman's log file; dockerd
    # itself is Docker's log reader, and what a container writes and exits with while dockerd is down is lost).
    OUTPUT_KEPT_WHILE_AWAY = "output_kept_while_away"


@dataclass(frozen=True)
class Mount:
    """A host path bound into the container; read-only unless said otherwise."""

    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class GpuDevice:
    """The GPU a worker gets: env always; a device attached only when `attach` (a real GPU via NVML)."""

    gpu_id: str
    uuid: str
    attach: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to run one worker; the defaults are the hardening described in this module."""

    image: str
    command: tuple[str, ...] = ()
    name: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    limits: Limits = field(default_factory=Limits)
    gpu: GpuDevice | None = None
    user: str = DEFAULT_USER
    workdir: str | None = None
    network_none: bool = True
    cap_drop: tuple[str, ...] = ("ALL",)
    no_new_privileges: bool = True
    read_only_rootfs: bool = True
    tmpfs_path: str = TMPFS_PATH
    stop_grace_seconds: float = 10.0

    @property
    def cpu_quota_us(self) -> int:
        """CPU quota per CPU_PERIOD_US for the cpus limit."""
        return max(1000, int(self.limits.cpus * CPU_PERIOD_US))


@dataclass(frozen=True)
class LogLine:
    """One line of a worker's output, without its newline. A very long line comes in pieces: each but the last
    has `partial` set (the line goes on in the next LogLine of the same stream; no newline between them)."""

    stream: Stream
    line: str
    partial: bool = False


@dataclass(frozen=True)
class ExitStatus:
    """How a container ended."""

    exit_code: int
    oom_killed: bool = False
    error: str = ""


@dataclass(frozen=True)
class ContainerInfo:
    """What list and inspect return: enough to rebuild gpud's state after a restart."""

    id: str
    name: str
    image: str
    state: ContainerState
    labels: Mapping[str, str]
    created: float  # seconds since the epoch
    exit_code: int | None = None
    oom_killed: bool = False

    @classmethod
    def from_engine(
        cls,
        data: Mapping[str, Any],
        *,
        name: str,
        image: object,
        state: ContainerState,
        labels: Mapping[str, str],
        exit_code: Any,
        oom_killed: bool,
    ) -> ContainerInfo:
        """What both engines' list entries and inspect documents give alike (`Id`, `Created`), with the fields each
        engine names its own way; the exit code only once the container has exited."""
        return cls(
            id=str(data.get("Id", "")),
            name=name.lstrip("/"),
            image=str(image),
            state=state,
            labels=dict(labels),
            created=parse_timestamp(data.get("Created", 0)),
            exit_code=None if state is not ContainerState.EXITED else int(exit_code or 0),
            oom_killed=oom_killed,
        )


@dataclass(frozen=True)
class EngineHealth:
    """Whether the engine answers, for /health."""

    runtime: str
    ok: bool
    isolated: bool
    version: str = ""
    detail: str = ""
    # Set when workers would run (or are refused) without the isolation gpud relies on; /health is then degraded.
    degraded: str = ""


class EngineUnavailable(Unavailable):
    """The container engine does not answer; gpud is degraded until it does."""

    code = "engine_unavailable"


class ImageUnavailable(Unavailable):
    """An allowed image is missing and could not be pulled."""

    code = "image_unavailable"

    @classmethod
    def for_image(cls, image: str, engine: str, reason: str) -> ImageUnavailable:
        """The error naming the image and how to provide it."""
        return cls(
            f"image {image!r} is not present in {engine} and could not be pulled: {reason}. "
            f"Build and import it with scripts/build-images.sh, or load it with `{engine} load`."
        )


class ContainerFailed(GpudError):
    """The engine refused to create or start the container; the message is the engine's."""

    code = "container_failed"


class ContainerNotFound(NotFound):
    """No container with that id."""

    code = "container_not_found"


@runtime_checkable
class ContainerRuntime(Protocol):
    """Runs worker containers on one engine. All methods raise EngineUnavailable when the engine is down."""

    name: str
    isolated: bool
    capabilities: frozenset[Capability]

    async def ensure_image(self, image: str, progress: ProgressCallback | None = None) -> None:
        """Make sure the image is present, pulling it once for all concurrent callers."""

    async def run(self, spec: ContainerSpec) -> str:
        """Create and start a container; return its id."""

    def logs(self, container_id: str, follow: bool = True) -> AsyncIterator[LogLine]:
        """Every output line since the start, in order per stream; with follow, until the container exits."""

    async def wait(self, container_id: str) -> ExitStatus:
        """Wait for the container to exit."""

    async def stop(self, container_id: str, grace_seconds: float) -> None:
        """SIGTERM, then SIGKILL after grace_seconds; no error if already stopped."""

    async def remove(self, container_id: str) -> None:
        """Remove the container (killing it if needed); no error if already gone."""

    async def inspect(self, container_id: str) -> ContainerInfo:
        """The container's current info, or ContainerNotFound."""

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        """All containers (running or not) carrying every given label."""

    async def health(self) -> EngineHealth:
        """Whether the engine answers now; never raises."""

    def reachable(self) -> bool:
        """Whether the engine's socket takes a connection now: a cheap, local check (no request; health asks the
        engine); never raises."""

    async def close(self) -> None:
        """Release connections and threads; containers keep running."""


def unix_socket_accepts(path: str) -> bool:
    """Whether a process listens on the Unix socket at `path`: a non-blocking connect, closed at once (no request
    is sent; a Unix socket connect completes or fails at once, so this does not block)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:  # its backlog is full: it listens, and is busy
            return True
        except OSError:  # no such socket, or nothing listens on it (refused)
            return False
    return True


def parse_timestamp(value: object) -> float:
    """Seconds since the epoch from an engine's `Created` (epoch number or RFC 3339 with nanoseconds)."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if not text:
        return 0.0
    # Python's parser takes at most microseconds and no 'Z' before 3.11; engines send nanoseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0
