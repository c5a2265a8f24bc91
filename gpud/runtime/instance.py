"""One gpud instance's view of a shared engine: its containers carry its instance id, and it lists only those.

Every container the daemon runs goes through this wrapper, so none can miss the label and no listing (the
reconciliation at start above all) can see, adopt or remove another instance's containers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping

from gpud.runtime.base import (
    LABEL_INSTANCE,
    ContainerInfo,
    ContainerRuntime,
    ContainerSpec,
    EngineHealth,
    ExitStatus,
    LogLine,
    ProgressCallback,
)


class InstanceRuntime:
    """Wraps a runtime: run() adds `gpud.instance=<id>` to the spec's labels, list() filters on it; the rest
    passes through."""

    def __init__(self, inner: ContainerRuntime, instance: str) -> None:
        self.inner = inner
        self.instance = instance
        self.name = inner.name
        self.isolated = inner.isolated
        self.capabilities = inner.capabilities

    async def ensure_image(self, image: str, progress: ProgressCallback | None = None) -> None:
        """As the engine's."""
        await self.inner.ensure_image(image, progress)

    async def run(self, spec: ContainerSpec) -> str:
        """Run the spec with this instance's label."""
        labels = {**spec.labels, LABEL_INSTANCE: self.instance}
        return await self.inner.run(dataclasses.replace(spec, labels=labels))

    def logs(self, container_id: str, follow: bool = True) -> AsyncIterator[LogLine]:
        """As the engine's."""
        return self.inner.logs(container_id, follow)

    async def wait(self, container_id: str) -> ExitStatus:
        """As the engine's."""
        return await self.inner.wait(container_id)

    async def stop(self, container_id: str, grace_seconds: float) -> None:
        """As the engine's."""
        await self.inner.stop(container_id, grace_seconds)

    async def remove(self, container_id: str) -> None:
        """As the engine's."""
        await self.inner.remove(container_id)

    async def inspect(self, container_id: str) -> ContainerInfo:
        """As the engine's."""
        return await self.inner.inspect(container_id)

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        """This instance's containers carrying every given label."""
        return await self.inner.list({**labels, LABEL_INSTANCE: self.instance})

    async def health(self) -> EngineHealth:
        """As the engine's."""
        return await self.inner.health()

    async def close(self) -> None:
        """As the engine's."""
        await self.inner.close()
