"""Docker runtime: the Docker Engine API on its Unix socket through aiodocker.

Why aiodocker rather than the official docker SDK: gpud is an aiohttp daemon, and aiodocker (aio-libs, the
same maintainers as aiohttp) is natively async on aiohttp's client — log follow and wait are plain awaits with
no thread per container, timeouts and cancellation behave like the rest of the daemon, and it adds no second
HTTP stack (the docker SDK is synchronous on requests and would need the thread-pool bridging podman-py needs).
Containers are created from the Engine API body built by the pure `docker_create_payload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from gpud.runtime.base import (
    CPU_PERIOD_US,
    Capability,
    ContainerFailed,
    ContainerInfo,
    ContainerNotFound,
    ContainerSpec,
    ContainerState,
    EngineHealth,
    EngineUnavailable,
    ExitStatus,
    ImageUnavailable,
    LogLine,
    ProgressCallback,
    Stream,
    unix_socket_accepts,
)
from gpud.runtime.exits import SharedWaits
from gpud.runtime.images import ImageEnsurer, PullObserver
from gpud.runtime.logsplit import FRAME_HEADER, LineSplitter, parse_header
from gpud.settings.images import normalize_reference

logger = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/docker.sock"
_T = TypeVar("_T")
_SHORT = aiohttp.ClientTimeout(total=60, sock_connect=5)
_LONG = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=5)
_CONNECTION_FAILED = 900  # aiodocker's status for "cannot connect to the engine"


def docker_create_payload(spec: ContainerSpec) -> dict[str, Any]:
    """The Engine API create body for a spec: hardening, limits, mounts, labels, GPU (DeviceRequests)."""
    limits = spec.limits
    host: dict[str, Any] = {
        "CapDrop": list(spec.cap_drop),
        "SecurityOpt": ["no-new-privileges"] if spec.no_new_privileges else [],
        "ReadonlyRootfs": spec.read_only_rootfs,
        "Tmpfs": {spec.tmpfs_path: f"rw,nosuid,nodev,size={limits.tmpfs_bytes},mode=1777"},
        "PidsLimit": limits.pids,
        "Memory": limits.memory_bytes,
        "MemorySwap": limits.memory_bytes,  # memory+swap equal to memory: no extra swap
        "CpuQuota": spec.cpu_quota_us,
        "CpuPeriod": CPU_PERIOD_US,
        "ShmSize": limits.shm_bytes,
        "Mounts": [
            {"Type": "bind", "Source": m.source, "Target": m.target, "ReadOnly": m.read_only} for m in spec.mounts
        ],
    }
    if spec.network_none:
        host["NetworkMode"] = "none"
    if spec.gpu is not None and spec.gpu.attach:
        host["DeviceRequests"] = [{"Driver": "nvidia", "DeviceIDs": [spec.gpu.uuid], "Capabilities": [["gpu"]]}]
    payload: dict[str, Any] = {
        "Image": spec.image,
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "Labels": dict(spec.labels),
        "User": spec.user,
        "StopTimeout": math.ceil(spec.stop_grace_seconds),
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,  # keeps stdout and stderr apart in the log stream
        "HostConfig": host,
    }
    if spec.network_none:
        payload["NetworkDisabled"] = True
    if spec.command:
        payload["Cmd"] = list(spec.command)
    if spec.workdir:
        payload["WorkingDir"] = spec.workdir
    return payload


def container_info(data: Mapping[str, Any]) -> ContainerInfo:
    """ContainerInfo from an Engine API list entry or inspect document."""
    state = data.get("State")
    if isinstance(state, dict):  # inspect
        status = ContainerState.parse(str(state.get("Status", "")))
        exit_code, oom = state.get("ExitCode"), bool(state.get("OOMKilled"))
        labels = (data.get("Config") or {}).get("Labels") or {}
        image = (data.get("Config") or {}).get("Image", data.get("Image", ""))
        name = str(data.get("Name", ""))
    else:  # list
        status = ContainerState.parse(str(state or ""))
        exit_code, oom = _exit_code_from_status(str(data.get("Status", ""))), False
        labels = data.get("Labels") or {}
        image = data.get("Image", "")
        name = str((data.get("Names") or [""])[0])
    return ContainerInfo.from_engine(
        data, name=name, image=image, state=status, labels=labels, exit_code=exit_code, oom_killed=oom
    )


# The list-entry fields container_info reads.
_LIST_FIELDS = ("Id", "Names", "Image", "State", "Status", "Labels", "Created")


def _list_entry(container: DockerContainer) -> dict[str, Any]:
    """The Engine API list entry a DockerContainer from containers.list() was made from.

    DockerContainer exposes the entry only through item access and `in` (no keys(), get() or dict view),
    so the fields container_info needs are copied out by name.
    """
    return {key: container[key] for key in _LIST_FIELDS if key in container}


def _exit_code_from_status(status: str) -> int | None:
    """The list endpoint only says `Exited (137) 2 seconds ago`."""
    if status.startswith("Exited (") and ")" in status:
        try:
            return int(status[len("Exited (") : status.index(")")])
        except ValueError:
            return None
    return None


class DockerRuntime:
    """Runs workers as Docker containers through the Engine API."""

    name = "docker"
    isolated = True
    capabilities = frozenset(Capability) - {Capability.OUTPUT_KEPT_WHILE_AWAY}

    def __init__(self, socket: str | None = None, *, on_pull: PullObserver | None = None) -> None:
        """`on_pull`: told each image pull's result."""
        self.socket = socket or DEFAULT_SOCKET
        self._docker: aiodocker.Docker | None = None  # made on first use: aiohttp needs a running loop
        self._images = ImageEnsurer(self._image_present, self._pull, on_pull)
        self._waits = SharedWaits()  # one wait per container for the task and its log reader

    @property
    def _client(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=f"unix://{self.socket}", timeout=_SHORT)
        return self._docker

    async def _guard(self, call: Callable[[], Awaitable[_T]], container_id: str = "") -> _T:
        """Run one engine call, turning connection failures and 404s into gpud errors."""
        try:
            return await call()
        except DockerError as exc:
            raise self._translate(exc, container_id) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineUnavailable(f"docker is not reachable at {self.socket}: {exc}") from exc

    def _translate(self, exc: DockerError, container_id: str) -> Exception:
        if exc.status == _CONNECTION_FAILED:
            return EngineUnavailable(f"docker is not reachable at {self.socket}: {exc.message}")
        if exc.status == 404 and container_id:
            return ContainerNotFound(f"no container {container_id}")
        return ContainerFailed(f"docker: {exc.message}")

    async def ensure_image(self, image: str, progress: ProgressCallback | None = None) -> None:
        """Pull the image once if missing (no registry here: a missing image fails naming how to build it)."""
        await self._images.ensure(image, progress)

    async def _image_present(self, image: str) -> bool:
        try:
            await self._guard(lambda: self._client.images.inspect(image))
        except ContainerFailed:  # 404 without a container id: the image is not here
            return False
        return True

    async def _pull(self, image: str, progress: ProgressCallback) -> None:
        try:
            stream = self._client.images.pull(normalize_reference(image), stream=True, timeout=None)
            async for item in stream:
                if item.get("error"):
                    raise ImageUnavailable.for_image(image, "docker", str(item["error"]))
                status = " ".join(str(item.get(k, "")) for k in ("status", "progress") if item.get(k))
                if status:
                    result = progress(status)
                    if result is not None:
                        await result
        except DockerError as exc:
            if exc.status == _CONNECTION_FAILED:
                raise EngineUnavailable(f"docker is not reachable at {self.socket}: {exc.message}") from exc
            raise ImageUnavailable.for_image(image, "docker", exc.message) from exc

    async def run(self, spec: ContainerSpec) -> str:
        """Create and start; a container that fails to start is removed again."""
        try:
            container = await self._create(spec)
        except ContainerFailed as exc:
            if "No such image" in exc.message:
                raise ImageUnavailable.for_image(spec.image, "docker", exc.message) from exc
            raise ContainerFailed(f"docker could not create the container: {exc.message}") from exc
        try:
            await self._guard(container.start)
        except ContainerFailed as exc:
            await self.remove(container.id)
            raise ContainerFailed(f"docker could not start the container: {exc.message}") from exc
        logger.debug("docker started %s (%s)", container.id[:12], spec.name)
        return str(container.id)

    async def _create(self, spec: ContainerSpec) -> DockerContainer:
        """Create the container. An image known to be here (so not looked up before this run) but gone since is
        pulled (or fails) as one never seen, and the create tried once more."""

        async def create() -> DockerContainer:
            return await self._guard(
                lambda: self._client.containers.create(docker_create_payload(spec), name=spec.name)
            )

        try:
            return await create()
        except ContainerFailed as exc:
            if "No such image" not in exc.message or not self._images.forget(spec.image):
                raise
        await self.ensure_image(spec.image)
        return await create()

    async def logs(self, container_id: str, follow: bool = True) -> AsyncIterator[LogLine]:
        """Lines from the multiplexed log stream, stdout and stderr kept apart."""
        splitter = LineSplitter()
        seen = 0
        async for stream, chunk in self._frames(container_id, follow=follow, skip=0):
            seen += 1
            for line in splitter.feed(stream, chunk):
                yield line
        if follow:
            # Docker closes a follow stream when the container dies, which can be before its log copier
            # has written the last output (an unterminated final line, notably). Read the finished log once
            # more and pass on only the frames after those already seen (one frame per log entry).
            try:
                await self.wait(container_id)
                async for stream, chunk in self._frames(container_id, follow=False, skip=seen):
                    for line in splitter.feed(stream, chunk):
                        yield line
            except ContainerNotFound:
                pass  # removed meanwhile: what was read is all there is
        for line in splitter.flush():
            yield line

    async def _frames(self, container_id: str, *, follow: bool, skip: int) -> AsyncIterator[tuple[Stream, bytes]]:
        """(stream, payload) per log frame, after the first `skip` frames."""
        params = {"stdout": True, "stderr": True, "follow": follow}
        # Private on purpose: aiodocker has no public call that returns the raw logs response. Its public
        # DockerContainer.log() decodes the frames into str and drops their stream id (stdout and stderr come
        # out merged), and attach(logs=True) is another endpoint that always follows and has no follow=False.
        # Docker._query gives the API-versioned, error-mapped response whose frames (with ids) are read here.
        query = self._client._query(f"containers/{container_id}/logs", params=params, timeout=_LONG)
        response = await self._guard(query.__aenter__, container_id)
        try:
            while True:
                try:
                    stream, length = parse_header(await response.content.readexactly(FRAME_HEADER))
                    chunk = await response.content.readexactly(length)
                except asyncio.IncompleteReadError:
                    return
                except aiohttp.ClientError as exc:
                    raise EngineUnavailable(f"docker log stream broke: {exc}") from exc
                if skip > 0:
                    skip -= 1
                    continue
                yield stream, chunk
        finally:
            await query.__aexit__(None, None, None)

    async def wait(self, container_id: str) -> ExitStatus:
        """Wait for exit, then read OOMKilled from inspect; one wait per container, shared by every caller."""
        return await self._waits.wait(container_id, lambda: self._wait(container_id))

    async def _wait(self, container_id: str) -> ExitStatus:
        container = self._client.containers.container(container_id)
        result = await self._guard(lambda: container.wait(timeout=_LONG), container_id)
        data = await self._guard(container.show, container_id)
        state = data.get("State") or {}
        return ExitStatus(
            exit_code=int(result.get("StatusCode", state.get("ExitCode", -1))),
            oom_killed=bool(state.get("OOMKilled")),
            error=str((result.get("Error") or {}).get("Message") or state.get("Error") or ""),
        )

    async def stop(self, container_id: str, grace_seconds: float) -> None:
        """SIGTERM, SIGKILL after the grace period; already stopped is fine."""
        grace = math.ceil(grace_seconds)
        container = self._client.containers.container(container_id)
        timeout = aiohttp.ClientTimeout(total=grace + 60, sock_connect=5)
        await self._guard(lambda: container.stop(t=grace, timeout=timeout), container_id)

    async def remove(self, container_id: str) -> None:
        """Force-remove with anonymous volumes; gone already is fine."""
        container = self._client.containers.container(container_id)
        self._waits.forget(container_id)
        with contextlib.suppress(ContainerNotFound):
            await self._guard(lambda: container.delete(force=True, v=True), container_id)

    async def inspect(self, container_id: str) -> ContainerInfo:
        """Current info from inspect."""
        container = self._client.containers.container(container_id)
        return container_info(await self._guard(container.show, container_id))

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        """All containers carrying every label."""
        filters = json.dumps({"label": [f"{k}={v}" for k, v in labels.items()]})
        found = await self._guard(lambda: self._client.containers.list(all=True, filters=filters))
        return [container_info(_list_entry(c)) for c in found]

    async def health(self) -> EngineHealth:
        """Ping and version; never raises."""
        try:
            version = await self._guard(self._client.version)
        except Exception as exc:
            return EngineHealth(runtime=self.name, ok=False, isolated=True, detail=str(exc))
        return EngineHealth(
            runtime=self.name, ok=True, isolated=True, version=str(version.get("Version", "")), detail=self.socket
        )

    def reachable(self) -> bool:
        """Whether the API socket takes a connection (no request)."""
        return unix_socket_accepts(self.socket)

    async def close(self) -> None:
        """Close the HTTP session (containers keep running)."""
        self._waits.cancel_all()
        if self._docker is not None:
            await self._docker.close()
            self._docker = None
