"""Podman runtime: podman-py against the libpod API socket (never the podman CLI).

podman-py is synchronous (requests), so every call runs in a bounded thread pool and the event loop stays
free: short calls share `max_workers` threads; calls that block for a container's lifetime (log follow, wait,
stop with grace) use a separate pool of `max_streams` threads so they cannot starve the short ones.
Containers are created from a libpod SpecGenerator built by the pure `podman_create_payload` (gpud/runtime/
podspec.py); their exit is learned as it happens (gpud/runtime/podexit.py), once per container for every caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import requests
from podman import PodmanClient
from podman.api.client import APIResponse
from podman.errors import APIError

from gpud.runtime.base import (
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
    unix_socket_accepts,
)
from gpud.runtime.crilog import follow_log_file
from gpud.runtime.exits import SharedWaits
from gpud.runtime.images import ImageEnsurer, PullObserver
from gpud.runtime.podexit import PodmanExits
from gpud.runtime.podspec import container_info, exit_status, message_of, podman_create_payload
from gpud.runtime.threadlogs import stream_in_thread

logger = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/podman/podman.sock"
CGROUP2_MARKER = "/sys/fs/cgroup/cgroup.controllers"  # present only on a unified (v2) hierarchy
_T = TypeVar("_T")
_SHORT = (5.0, 60.0)
# libpod's wait polls the container state; its default 250 ms would add up to that much to every exit.
WAIT_POLL = "20ms"  # (connect, read) seconds for calls that should answer promptly


class PodmanRuntime:
    """Runs workers as Podman containers through the libpod API."""

    name = "podman"
    isolated = True

    def __init__(
        self,
        socket: str | None = None,
        *,
        max_workers: int = 8,
        max_streams: int = 64,
        log_files: bool = True,
        on_pull: PullObserver | None = None,
    ) -> None:
        """`log_files`: read output from the containers' log files when readable here (False: always the API);
        `on_pull`: told each image pull's result."""
        self.socket = socket or DEFAULT_SOCKET
        self._log_files = log_files
        self.capabilities = frozenset(Capability)
        if not os.path.exists(CGROUP2_MARKER):
            # On cgroup v1, Debian's podman 4.3 + conmon 2.1.6 enforce the limit but never report the kill:
            # conmon sees the OOM event yet writes its `oom` marker into its working directory (no
            # --persist-dir is passed), not where podman looks, so inspect says OOMKilled=false.
            self.capabilities -= {Capability.OOM_REPORT}
        # No client-wide timeout: follow/wait must block as long as the container runs; short calls pass _SHORT.
        self._client = PodmanClient(base_url=f"unix://{self.socket}")
        self._ops = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="podman-op")
        self._streams = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="podman-stream")
        self._images = ImageEnsurer(self._image_present, self._pull, on_pull)
        self._log_paths: dict[str, str | None] = {}  # container id -> its readable log file (None: use the API)
        # Where this engine keeps a container's log file, around its id (learned from the first inspect): later
        # containers' files are found without an inspect before their first output.
        self._log_layout: tuple[str, str] | None = None
        self._waits = SharedWaits()
        self._exits = PodmanExits(self._inspect_state, self._api_wait)
        self._version: str | None = None  # the engine's, once asked (see health)

    async def _in(self, pool: ThreadPoolExecutor, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    def _request(self, method: str, path: str, **kwargs: Any) -> APIResponse:
        """One libpod call (in a worker thread); connection failures become EngineUnavailable."""
        kwargs.setdefault("timeout", _SHORT)
        api = self._client.api
        # APIClient's public verbs hand path, params, data, headers, timeout and stream unchanged to the
        # same request builder (params go to requests as given: booleans as True/False, lists as repeated
        # keys); their stream=False default equals the session default that stream=None falls back to.
        send: Callable[..., APIResponse] = {"GET": api.get, "POST": api.post, "DELETE": api.delete}[method]
        try:
            return send(path, **kwargs)
        except (APIError, requests.RequestException, OSError) as exc:
            raise EngineUnavailable(f"podman is not reachable at {self.socket}: {exc}") from exc

    async def _call(self, method: str, path: str, *, long: bool = False, **kwargs: Any) -> APIResponse:
        pool = self._streams if long else self._ops
        return await self._in(pool, lambda: self._request(method, path, **kwargs))

    async def ensure_image(self, image: str, progress: ProgressCallback | None = None) -> None:
        """Pull the image once if missing (no registry here: a missing image fails naming how to build it)."""
        await self._images.ensure(image, progress)

    async def _image_present(self, image: str) -> bool:
        resp = await self._call("GET", f"/images/{image}/exists")
        return resp.status_code == 204

    async def _pull(self, image: str, progress: ProgressCallback) -> None:
        resp = await self._call("POST", "/images/pull", long=True, params={"reference": image}, stream=True)
        if resp.status_code >= 400:
            raise ImageUnavailable.for_image(image, "podman", message_of(resp))
        lines = await self._in(self._streams, lambda: [json.loads(x) for x in resp.iter_lines() if x])
        for line in lines:
            if line.get("error"):
                raise ImageUnavailable.for_image(image, "podman", str(line["error"]).strip())
            if line.get("stream"):
                result = progress(str(line["stream"]).strip())
                if result is not None:
                    await result

    async def run(self, spec: ContainerSpec) -> str:
        """Create and start; a container that fails to start is removed again."""
        body = json.dumps(podman_create_payload(spec))
        headers = {"content-type": "application/json"}
        resp = await self._call("POST", "/containers/create", data=body, headers=headers)
        if resp.status_code == 404 and self._images.forget(spec.image):
            # The image was known to be here (so not looked up before this run) and is gone since: pull it or fail
            # as for an image never seen, then create once more.
            await self.ensure_image(spec.image)
            resp = await self._call("POST", "/containers/create", data=body, headers=headers)
        if resp.status_code == 404:
            raise ImageUnavailable.for_image(spec.image, "podman", message_of(resp))
        if resp.status_code >= 400:
            raise ContainerFailed(f"podman could not create the container: {message_of(resp)}")
        container_id = str(resp.json()["Id"])
        started = await self._call("POST", f"/containers/{container_id}/start")
        if started.status_code >= 400:
            await self.remove(container_id)
            raise ContainerFailed(f"podman could not start the container: {message_of(started)}")
        logger.debug("podman started %s (%s)", container_id[:12], spec.name)
        return container_id

    async def logs(self, container_id: str, follow: bool = True) -> AsyncIterator[LogLine]:
        """Lines from the container's log file (gpud/runtime/crilog.py), stdout and stderr kept apart; from the
        libpod log API when the file cannot be read here (another log driver, a remote engine)."""
        path = await self._log_file(container_id)
        if path is not None:
            source = follow_log_file(path, follow, lambda: self.wait(container_id), self._ops)
        else:
            source = self._api_logs(container_id, follow)
        async with contextlib.aclosing(source) as lines:
            async for line in lines:
                yield line

    async def _log_file(self, container_id: str) -> str | None:
        """The container's k8s-file log, if this process can read it (known once, so no engine call is needed
        to follow it again while the engine does not answer)."""
        if not self._log_files:
            return None
        if container_id not in self._log_paths:
            path = self._known_log_path(container_id)
            if path is None:
                config = (await self._inspect_raw(container_id)).get("HostConfig", {}).get("LogConfig") or {}
                found = str(config.get("Path") or "")
                if config.get("Type") == "k8s-file" and found and os.access(found, os.R_OK):
                    path = found
                    head, sep, tail = found.partition(container_id)
                    self._log_layout = (head, tail) if sep and container_id not in tail else self._log_layout
            self._log_paths[container_id] = path
        return self._log_paths[container_id]

    def _known_log_path(self, container_id: str) -> str | None:
        """The log file where this engine put the others' (the k8s-file driver's `<container dir>/userdata/ctr.log`,
        made by conmon before the container starts), if it is there and readable; None: ask inspect."""
        if self._log_layout is None:
            return None
        path = self._log_layout[0] + container_id + self._log_layout[1]
        return path if os.access(path, os.R_OK) else None

    def _api_logs(self, container_id: str, follow: bool) -> AsyncGenerator[LogLine, None]:
        """Lines from the multiplexed libpod log stream. Its follow can end at the container's exit before the
        rest was sent, so the finished log is then read again, skipping (per stream) the bytes already read."""

        def open_stream(follow: bool = follow, gone_ok: bool = False) -> APIResponse | None:
            path = f"/containers/{container_id}/logs"
            params = {"stdout": True, "stderr": True, "follow": follow}
            resp = self._request("GET", path, params=params, stream=True, timeout=(5.0, None))
            if resp.status_code == 404:
                if gone_ok:
                    return None
                raise ContainerNotFound(f"no container {container_id}")
            if resp.status_code >= 400:
                raise ContainerFailed(f"podman could not read logs: {message_of(resp)}")
            return resp

        reread = follow

        def more(stop: threading.Event) -> APIResponse | None:
            nonlocal reread
            if not reread:
                return None
            reread = False
            if not self._exited_blocking(container_id, stop):
                return None  # removed meanwhile (or the reader left): what was read is all there is
            return open_stream(follow=False, gone_ok=True)

        return stream_in_thread(self._streams, open_stream, more)

    def _exited_blocking(self, container_id: str, stop: threading.Event) -> bool:
        """Poll (in a pool thread) until the container has exited: True; False when it is gone or stop is set."""
        while not stop.is_set():
            resp = self._request("GET", f"/containers/{container_id}/json")
            if resp.status_code == 404:
                return False
            self._raise_for(resp, container_id)
            if container_info(resp.json()).state is ContainerState.EXITED:
                return True
            stop.wait(0.05)
        return False

    async def wait(self, container_id: str) -> ExitStatus:
        """The exit status once the engine says the container has exited (gpud/runtime/podexit.py: as it happens,
        not after conmon's cleanup); one wait per container, shared by every caller (the task and its output)."""
        return await self._waits.wait(container_id, lambda: self._exits.wait(container_id))

    async def _inspect_state(self, container_id: str) -> dict[str, Any]:
        return dict((await self._inspect_raw(container_id)).get("State") or {})

    async def _api_wait(self, container_id: str) -> ExitStatus:
        """libpod's wait (in the stream pool: it returns after conmon's cleanup), then exit code and OOM from
        inspect."""
        resp = await self._call(
            "POST",
            f"/containers/{container_id}/wait",
            long=True,
            params={"condition": ["stopped", "exited"], "interval": WAIT_POLL},
            timeout=(5.0, None),
        )
        self._raise_for(resp, container_id)
        return exit_status(await self._inspect_state(container_id))

    async def stop(self, container_id: str, grace_seconds: float) -> None:
        """libpod stop: SIGTERM, SIGKILL after the grace period; 304 (already stopped) is fine."""
        grace = math.ceil(grace_seconds)
        resp = await self._call(
            "POST",
            f"/containers/{container_id}/stop",
            long=True,
            params={"timeout": grace},
            timeout=(5.0, grace + 60.0),
        )
        self._raise_for(resp, container_id)

    async def remove(self, container_id: str) -> None:
        """Force-remove with anonymous volumes; gone already is fine."""
        # timeout=0: kill at once; without it libpod first waits out the container's stop timeout.
        params = {"force": True, "v": True, "timeout": 0}
        self._log_paths.pop(container_id, None)
        self._waits.forget(container_id)
        for attempt in range(3):
            resp = await self._call("DELETE", f"/containers/{container_id}", params=params)
            if resp.status_code == 404:
                return
            # A container exiting just as it is removed makes libpod 4.3 fail the kill ("state improper");
            # it is stopped then, so the next try removes it.
            if resp.status_code < 400 or "state improper" not in message_of(resp) or attempt == 2:
                break
            await asyncio.sleep(0.1)
        self._raise_for(resp, container_id)

    async def inspect(self, container_id: str) -> ContainerInfo:
        """Current info from libpod inspect."""
        return container_info(await self._inspect_raw(container_id))

    async def _inspect_raw(self, container_id: str) -> dict[str, Any]:
        resp = await self._call("GET", f"/containers/{container_id}/json")
        self._raise_for(resp, container_id)
        return dict(resp.json())

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        """All containers carrying every label."""
        filters = json.dumps({"label": [f"{k}={v}" for k, v in labels.items()]})
        resp = await self._call("GET", "/containers/json", params={"all": True, "filters": filters})
        self._raise_for(resp, "")
        return [container_info(entry) for entry in resp.json() or []]

    async def health(self) -> EngineHealth:
        """Ping, and the version (asked once per time the engine comes up); never raises.

        libpod answers /version by running conmon and the OCI runtime to ask theirs (0.6 s here, and serialised:
        15 at once took 2.5 s each), while /_ping takes 10 ms; every /health asks this (and a submission when the last
        known state is not good: gpud/runtime/instance.py)."""
        try:
            resp = await self._call("GET", "/_ping", timeout=(2.0, 5.0))
            self._raise_for(resp, "")
            if self._version is None:
                resp = await self._call("GET", "/version", timeout=(2.0, 5.0))
                self._raise_for(resp, "")
                self._version = str(resp.json().get("Version", ""))
        except Exception as exc:
            self._version = None  # it may come back another version
            return EngineHealth(runtime=self.name, ok=False, isolated=True, detail=str(exc))
        return EngineHealth(runtime=self.name, ok=True, isolated=True, version=self._version, detail=self.socket)

    def reachable(self) -> bool:
        """Whether the API socket takes a connection (no request)."""
        return unix_socket_accepts(self.socket)

    async def close(self) -> None:
        """Close the HTTP session and the thread pools (containers keep running)."""
        self._waits.cancel_all()
        self._client.close()
        self._ops.shutdown(wait=False, cancel_futures=True)
        self._streams.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _raise_for(resp: APIResponse, container_id: str) -> None:
        if resp.status_code == 404 and container_id:
            raise ContainerNotFound(f"no container {container_id}")
        if resp.status_code >= 400:
            raise ContainerFailed(f"podman: {message_of(resp)}")
