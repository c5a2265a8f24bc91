"""Container runtimes: one interface (base.ContainerRuntime), chosen by name with GPUD_RUNTIME.

- ``podman``: podman-py against the libpod API socket (GPUD_RUNTIME_SOCKET, default /run/podman/podman.sock).
- ``docker``: aiodocker against the Docker Engine API socket (default /var/run/docker.sock).
- ``process``: local subprocesses without isolation, for development; must be chosen explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpud.errors import InvalidRequest
from gpud.runtime.base import ContainerRuntime
from gpud.runtime.docker import DockerRuntime
from gpud.runtime.podman import PodmanRuntime
from gpud.runtime.process import ProcessRuntime

RuntimeFactory = Callable[..., ContainerRuntime]

RUNTIMES: dict[str, RuntimeFactory] = {
    "podman": PodmanRuntime,
    "docker": DockerRuntime,
    "process": ProcessRuntime,
}


def make_runtime(name: str, socket: str | None = None, **options: Any) -> ContainerRuntime:
    """Build the runtime called `name` talking to `socket` (None: the engine's default socket)."""
    factory = RUNTIMES.get(name)
    if factory is None:
        raise InvalidRequest(
            f"unknown runtime {name!r}; choose one of {', '.join(sorted(RUNTIMES))}", code="unknown_runtime"
        )
    return factory(socket, **options)


__all__ = ["RUNTIMES", "ContainerRuntime", "make_runtime"]
