"""One gpud instance's view of a shared engine: its containers carry its instance id, and it lists only those.

Every container the daemon runs goes through this wrapper, so none can miss the label and no listing (the
reconciliation at start above all) can see, adopt or remove another instance's containers. Every engine call
passes here too, so this is where the engine's health is watched and its failures are counted (metrics), and where
new work asks whether the engine is up without a round trip of its own (`health_for_new_work`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TypeVar

from gpud.metrics import Metrics
from gpud.runtime.base import (
    LABEL_INSTANCE,
    ContainerFailed,
    ContainerInfo,
    ContainerRuntime,
    ContainerSpec,
    EngineHealth,
    EngineUnavailable,
    ExitStatus,
    LogLine,
    ProgressCallback,
)

_T = TypeVar("_T")

# How long a good answer from the engine is trusted when new work asks (the daemon probes every 5 s, and every
# engine call that succeeds renews it); past it, or once a call found the engine away, new work waits for a probe.
TRUST_SECONDS = 15.0


class InstanceRuntime:
    """Wraps a runtime: run() adds `gpud.instance=<id>` to the spec's labels, list() filters on it; the rest
    passes through. With `metrics`, engine calls that fail count as engine errors and health sets engine_up."""

    def __init__(self, inner: ContainerRuntime, instance: str, metrics: Metrics | None = None) -> None:
        self.inner = inner
        self.instance = instance
        self.name = inner.name
        self.isolated = inner.isolated
        self.capabilities = inner.capabilities
        self._metrics = metrics
        self._last: EngineHealth | None = None  # the last probe's answer
        self._good_at: float | None = None  # when the engine last answered (monotonic); None: it did not since

    async def _counted(self, call: Awaitable[_T]) -> _T:
        """Await an engine call; one the engine could not serve (unreachable, or it answered with an error)
        counts as an engine error. A missing container or image is an answer, not an engine error."""
        try:
            result = await call
        except (EngineUnavailable, ContainerFailed) as exc:
            if isinstance(exc, EngineUnavailable):
                self._good_at = None
            if self._metrics is not None:
                self._metrics.engine_errors.inc()
            raise
        self._good_at = time.monotonic()
        return result

    async def ensure_image(self, image: str, progress: ProgressCallback | None = None) -> None:
        """As the engine's."""
        await self._counted(self.inner.ensure_image(image, progress))

    async def run(self, spec: ContainerSpec) -> str:
        """Run the spec with this instance's label."""
        labels = {**spec.labels, LABEL_INSTANCE: self.instance}
        return await self._counted(self.inner.run(dataclasses.replace(spec, labels=labels)))

    def logs(self, container_id: str, follow: bool = True) -> AsyncIterator[LogLine]:
        """As the engine's."""
        return self.inner.logs(container_id, follow)

    async def wait(self, container_id: str) -> ExitStatus:
        """As the engine's."""
        return await self._counted(self.inner.wait(container_id))

    async def stop(self, container_id: str, grace_seconds: float) -> None:
        """As the engine's."""
        await self._counted(self.inner.stop(container_id, grace_seconds))

    async def remove(self, container_id: str) -> None:
        """As the engine's."""
        await self._counted(self.inner.remove(container_id))

    async def inspect(self, container_id: str) -> ContainerInfo:
        """As the engine's."""
        return await self._counted(self.inner.inspect(container_id))

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        """This instance's containers carrying every given label."""
        return await self._counted(self.inner.list({**labels, LABEL_INSTANCE: self.instance}))

    async def health(self) -> EngineHealth:
        """As the engine's; sets engine_up (and counts a failed probe as an engine error)."""
        health = await self.inner.health()
        self._last = health
        self._good_at = time.monotonic() if health.ok else None
        if self._metrics is not None:
            self._metrics.engine_up.set(1 if health.ok else 0)
            if not health.ok:
                self._metrics.engine_errors.inc()
        return health

    async def recent_health(self) -> EngineHealth:
        """The engine's health for admitting new work: the last probe's answer while it was good, the engine has
        answered within TRUST_SECONDS and its socket still takes a connection (an engine that stopped is seen at
        once); otherwise a probe now."""
        last = self._last
        if last is not None and last.ok and self._answered_lately() and self.inner.reachable():
            return last
        return await self.health()

    def _answered_lately(self) -> bool:
        return self._good_at is not None and time.monotonic() - self._good_at < TRUST_SECONDS

    def reachable(self) -> bool:
        """As the engine's."""
        return self.inner.reachable()

    async def close(self) -> None:
        """As the engine's."""
        await self.inner.close()


async def health_for_new_work(runtime: ContainerRuntime) -> EngineHealth:
    """Whether new work may start on the engine: InstanceRuntime.recent_health (the daemon's runtime), or a probe."""
    if isinstance(runtime, InstanceRuntime):
        return await runtime.recent_health()
    return await runtime.health()
