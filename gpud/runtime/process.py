"""Process runtime: the preset's command as a local subprocess, for development machines without an engine.

Like Nomad's raw_exec it gives NO container isolation (`isolated = False`, and /health says so); it must be
chosen explicitly. It keeps the environment contract: the same GPUD_* and GPU variables, with container paths
(MODEL_PATH=/models, mount targets) rewritten to the host paths they are bound from. The image is not
used. What it does enforce, cheaply and honestly, is listed in `capabilities`:

- no network (`unshare --net`), when running as root and unshare works here;
- the spec's user (each worker's own uid from gpud) when running as root, with no supplementary groups;
- a private TMPDIR and HOME (0700, the worker's), a new session (the whole process group is signalled),
  nofile/core rlimits (prlimit).

Without `unshare --net` (or without root) workers would share the host's network and, without root, gpud's own
user: the runtime then refuses to start them unless GPUD_PROCESS_ALLOW_UNISOLATED is set, and /health is
degraded either way (`EngineHealth.degraded`).

Memory, pids, read-only root and read-only /models are not enforced, so those capabilities are absent and
the contract tests skip them with that reason. Processes do not outlive the runtime object.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpud.runtime.base import (
    Capability,
    ContainerFailed,
    ContainerInfo,
    ContainerNotFound,
    ContainerSpec,
    ContainerState,
    EngineHealth,
    ExitStatus,
    LogLine,
    ProgressCallback,
    Stream,
)
from gpud.runtime.logsplit import LineSplitter

logger = logging.getLogger(__name__)

_KEEP_LINES = 10_000  # output kept per process for late readers; older lines are dropped
_KEEP_CHARS = 8 * 1024 * 1024  # ... and at most this much text of them (a worker printing 100 MB holds 8)


def host_path(value: str, path_map: Mapping[str, str]) -> str:
    """Rewrite a container path (e.g. /models/x) to the host path it is bound from; others unchanged."""
    for target in sorted(path_map, key=len, reverse=True):
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return path_map[target] + value[len(target) :]
    return value


def probe_unshare() -> tuple[str | None, str]:
    """The path of an `unshare` whose `--net` works here (root, not forbidden by an outer sandbox), or None and
    why not. `unshare` is looked up on PATH, so a PATH without it is a host without it."""
    if os.geteuid() != 0:
        return None, "gpud is not root"
    path = shutil.which("unshare")
    if path is None:
        return None, "`unshare` is not on PATH"
    try:
        done = subprocess.run([path, "--net", "true"], timeout=5, check=False, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"`unshare --net` failed: {exc}"
    if done.returncode != 0:
        return None, f"`unshare --net` failed: {done.stderr.strip() or done.returncode}"
    return path, ""


def worker_ids(user: str) -> tuple[int, int]:
    """A spec's numeric `uid[:gid]` (or root) as ids; ContainerFailed for a name, which the host cannot map."""
    uid, _, gid = ("0:0" if user == "root" else user).partition(":")
    if not uid.isdigit() or not (gid or uid).isdigit():
        raise ContainerFailed(f"the process runtime needs a numeric user (uid or uid:gid), got {user!r}")
    return int(uid), int(gid or uid)


@dataclass
class _Proc:
    id: str
    spec: ContainerSpec
    proc: asyncio.subprocess.Process
    tmpdir: str
    created: float
    lines: list[LogLine] = field(default_factory=list)
    dropped: int = 0  # lines trimmed from the front of `lines`
    kept_chars: int = 0  # text held in `lines`
    output_done: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    reaper: asyncio.Task[None] | None = None
    # Followers (logs with follow) and the absolute line each has read up to: lines one has not read are kept.
    followers: dict[object, int] = field(default_factory=dict)

    def has_news(self, position: int) -> bool:
        """Whether a reader at absolute line `position` has something to read or the output has ended."""
        return self.output_done or self.dropped + len(self.lines) > position

    def state(self) -> ContainerState:
        return ContainerState.RUNNING if self.proc.returncode is None else ContainerState.EXITED

    def exit_code(self) -> int | None:
        code = self.proc.returncode
        return None if code is None else (128 - code if code < 0 else code)  # signal -> 128+N, as engines do


def _trim(record: _Proc) -> bool:
    """Drop the oldest lines while more are kept than the bounds allow, but none a follower has yet to read (and
    never the last); True when still over the bounds because a follower has yet to read the oldest."""
    floor = min(record.followers.values(), default=record.dropped + len(record.lines))
    excess, kept = 0, len(record.lines)

    def over() -> bool:
        return kept - excess > _KEEP_LINES or record.kept_chars > _KEEP_CHARS

    while excess < kept - 1 and record.dropped + excess < floor and over():
        record.kept_chars -= len(record.lines[excess].line)
        excess += 1
    if excess > 0:
        del record.lines[:excess]
        record.dropped += excess
    return over() and floor <= record.dropped


class ProcessRuntime:
    """Runs workers as local subprocesses; not isolated."""

    name = "process"
    isolated = False

    def __init__(
        self,
        socket: str | None = None,
        *,
        allow_unisolated: bool = False,
        unshare: tuple[str | None, str] | None = None,
        image_dirs: Mapping[str, str] | None = None,
    ) -> None:
        """`unshare`: a probe_unshare() result to use instead of probing (None: probe now). `image_dirs`: host
        directories standing in for the image's (e.g. /opt/gpud/examples), rewritten like mount targets."""
        del socket  # accepted so every runtime is built the same way; there is no engine
        self._image_dirs = dict(image_dirs or {})
        self._procs: dict[str, _Proc] = {}
        self._is_root = os.geteuid() == 0
        self._unshare, self._no_unshare_reason = probe_unshare() if unshare is None else unshare
        self._allow_unisolated = allow_unisolated
        self._prlimit = shutil.which("prlimit")
        caps: set[Capability] = {Capability.OUTPUT_KEPT_WHILE_AWAY}  # there is no engine to go away
        if self._unshare:
            caps.add(Capability.NETWORK_NONE)
        if self._is_root:
            caps.add(Capability.NON_ROOT_USER)  # the worker is started as the spec's user
        self.capabilities = frozenset(caps)
        if self._unshare is None:
            logger.warning("process runtime: %s", self._unisolated())

    def _unisolated(self) -> str:
        """Why workers are not isolated and what gpud does about it ("" when they are)."""
        if self._unshare:
            return ""
        why = f"workers cannot be isolated ({self._no_unshare_reason}: no private network"
        why += ")" if self._is_root else ", and they would run as gpud's own user)"
        if self._allow_unisolated:
            return f"{why}; they run unisolated because GPUD_PROCESS_ALLOW_UNISOLATED is set"
        return f"{why}; they are refused (set GPUD_PROCESS_ALLOW_UNISOLATED=true to run them anyway)"

    def _check_user(self, uid: int, gid: int) -> None:
        """ContainerFailed unless a worker as uid:gid can be started with the isolation gpud promises."""
        if not self._unshare and not self._allow_unisolated:
            raise ContainerFailed(f"process runtime: {self._unisolated()}")
        if not self._is_root and (uid, gid) != (os.geteuid(), os.getegid()):
            raise ContainerFailed(f"process runtime: gpud is not root, so it cannot run a worker as {uid}:{gid}")

    async def ensure_image(self, image: str, progress: ProgressCallback | None = None) -> None:
        """Nothing to fetch: the process runtime runs the command on the host."""

    def _argv(self, spec: ContainerSpec, path_map: Mapping[str, str], uid: int, gid: int) -> list[str]:
        argv = [host_path(arg, path_map) for arg in spec.command]
        if self._unshare:
            # unshare switches user after entering the namespace, and --setgid also drops supplementary groups.
            drop = [] if uid == 0 else ["--setuid", str(uid), "--setgid", str(gid)]
            argv = [self._unshare, "--net", *drop, "--", *argv]
        if self._prlimit:
            argv = [self._prlimit, "--nofile=1024:1024", "--core=0", "--", *argv]
        return argv

    def _env(self, spec: ContainerSpec, path_map: Mapping[str, str], tmpdir: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": tmpdir,
            "TMPDIR": tmpdir,
            "PYTHONUNBUFFERED": "1",
        }
        env.update({k: host_path(v, path_map) for k, v in spec.env.items()})
        return env

    async def run(self, spec: ContainerSpec) -> str:
        """Start the command; ContainerFailed if it cannot start (no command, missing mount source ...)."""
        if not spec.command:
            raise ContainerFailed("the process runtime needs a preset command (it cannot run an image)")
        if spec.name and any(p.spec.name == spec.name for p in self._procs.values()):
            raise ContainerFailed(f"a process named {spec.name!r} already exists")
        for mount in spec.mounts:
            if not os.path.exists(mount.source):
                raise ContainerFailed(f"mount source {mount.source} does not exist")
        uid, gid = worker_ids(spec.user)
        self._check_user(uid, gid)
        tmpdir = tempfile.mkdtemp(prefix="gpud-proc-")  # 0700: the worker's alone once chowned
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(tmpdir, uid, gid)
        # Without unshare, a root gpud still starts the worker as its user (no supplementary groups).
        switch: dict[str, Any] = {}
        if not self._unshare and self._is_root and uid != 0:
            switch = {"user": uid, "group": gid, "extra_groups": []}
        # Only bind mounts are rewritten: an argument under /tmp is a host path here (the worker's own scratch
        # space is TMPDIR), and rewriting it would break checkouts and files that live under the host's /tmp.
        path_map = {**self._image_dirs, **{m.target: m.source for m in spec.mounts}}
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(spec, path_map, uid, gid),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env(spec, path_map, tmpdir),
                cwd=tmpdir,
                start_new_session=True,  # its own process group, so stop/remove reach every child
                **switch,
            )
        except OSError as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise ContainerFailed(f"could not start {spec.command[0]!r}: {exc}") from exc
        record = _Proc(id=uuid.uuid4().hex, spec=spec, proc=proc, tmpdir=tmpdir, created=time.time())
        assert proc.stdout is not None and proc.stderr is not None
        splitter = LineSplitter()
        record.pumps = [
            asyncio.create_task(self._pump(record, splitter, Stream.STDOUT, proc.stdout)),
            asyncio.create_task(self._pump(record, splitter, Stream.STDERR, proc.stderr)),
        ]
        record.reaper = asyncio.create_task(self._reap(record))
        self._procs[record.id] = record
        return record.id

    async def _pump(self, record: _Proc, splitter: LineSplitter, stream: Stream, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            await self._append(record, splitter.feed(stream, chunk))
        await self._append(record, splitter.flush(stream))
        if all(t.done() for t in record.pumps if t is not asyncio.current_task()):
            async with record.changed:
                record.output_done = True
                record.changed.notify_all()

    async def _reap(self, record: _Proc) -> None:
        """When the main process exits, kill what it left behind, as an engine does when pid 1 exits."""
        await record.proc.wait()
        self._signal(record, signal.SIGKILL)

    @staticmethod
    async def _append(record: _Proc, lines: list[LogLine]) -> None:
        if not lines:
            return
        async with record.changed:
            record.lines.extend(lines)
            record.kept_chars += sum(len(line.line) for line in lines)
            record.changed.notify_all()
            # Past the bounds, the oldest lines go (a late reader misses them), but never ones a follower has yet
            # to read: the worker then waits (its pipe fills) until the follower catches up, so no follower
            # ever loses output, and what is kept stays within the bounds.
            while _trim(record):
                await record.changed.wait()

    async def logs(self, container_id: str, follow: bool = True) -> AsyncIterator[LogLine]:
        """Every kept line; with follow, every line from the start (the worker waits for a slow follower),
        until both output pipes close."""
        record = self._get(container_id)
        position = 0  # absolute line number
        token = object()
        if follow:
            record.followers[token] = position
        try:
            while True:
                async with record.changed:
                    record.followers[token] = position
                    record.changed.notify_all()  # a pump may be waiting for this follower to read on
                    if follow:
                        await record.changed.wait_for(functools.partial(record.has_news, position))
                    start = max(position, record.dropped)
                    batch = record.lines[start - record.dropped :]
                    done = record.output_done or not follow
                for line in batch:
                    yield line
                position = start + len(batch)
                if done and not batch:
                    return
        finally:
            record.followers.pop(token, None)
            if follow:
                async with record.changed:
                    record.changed.notify_all()

    async def wait(self, container_id: str) -> ExitStatus:
        """Wait for the process to exit (and its output to be read)."""
        record = self._get(container_id)
        await record.proc.wait()
        await asyncio.gather(*record.pumps, return_exceptions=True)
        code = record.exit_code()
        return ExitStatus(exit_code=-1 if code is None else code)

    async def stop(self, container_id: str, grace_seconds: float) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period."""
        record = self._get(container_id)
        self._signal(record, signal.SIGTERM)
        try:
            await asyncio.wait_for(record.proc.wait(), timeout=grace_seconds)
        except TimeoutError:
            logger.info("process %s ignored SIGTERM for %.1fs; killing", container_id[:12], grace_seconds)
        self._signal(record, signal.SIGKILL)  # also reaps children left behind by a clean exit
        await record.proc.wait()

    @staticmethod
    def _signal(record: _Proc, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.proc.pid, sig)

    async def remove(self, container_id: str) -> None:
        """Kill if running, forget it, delete its TMPDIR; gone already is fine."""
        record = self._procs.pop(container_id, None)
        if record is None:
            return
        self._signal(record, signal.SIGKILL)
        await record.proc.wait()
        for task in record.pumps:
            task.cancel()
        shutil.rmtree(record.tmpdir, ignore_errors=True)

    async def inspect(self, container_id: str) -> ContainerInfo:
        """Current info."""
        return self._info(self._get(container_id))

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        """This runtime object's processes carrying every label."""
        return [
            self._info(r) for r in self._procs.values() if all(r.spec.labels.get(k) == v for k, v in labels.items())
        ]

    async def health(self) -> EngineHealth:
        """Always reachable; never container-isolated; degraded when workers cannot even be kept apart."""
        unisolated = self._unisolated()
        return EngineHealth(
            runtime=self.name,
            ok=True,
            isolated=False,
            detail="process runtime: workers run on the host without container isolation",
            degraded=f"process runtime: {unisolated}" if unisolated else "",
        )

    def reachable(self) -> bool:
        """Always: there is no engine."""
        return True

    async def close(self) -> None:
        """Kill and forget every process (they do not outlive gpud)."""
        for container_id in list(self._procs):
            await self.remove(container_id)

    def _get(self, container_id: str) -> _Proc:
        record = self._procs.get(container_id)
        if record is None:
            raise ContainerNotFound(f"no process {container_id}")
        return record

    @staticmethod
    def _info(record: _Proc) -> ContainerInfo:
        return ContainerInfo(
            id=record.id,
            name=record.spec.name or record.id,
            image=record.spec.image,
            state=record.state(),
            labels=dict(record.spec.labels),
            created=record.created,
            exit_code=record.exit_code(),
        )
