"""New work asks whether the engine is up without a round trip of its own (gpud/runtime/instance.py): the last probe's
good answer is used while the engine answered lately and its socket takes connections; otherwise it is probed."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gpud.runtime import instance
from gpud.runtime.base import EngineHealth, EngineUnavailable, unix_socket_accepts
from gpud.runtime.instance import InstanceRuntime, health_for_new_work


class Engine:
    """Counts probes; `up` says what they answer and whether the socket takes connections."""

    name = "podman"
    isolated = True
    capabilities: frozenset = frozenset()

    def __init__(self) -> None:
        self.up = True
        self.probes = 0

    async def health(self) -> EngineHealth:
        self.probes += 1
        return EngineHealth(runtime=self.name, ok=self.up, isolated=True, detail="" if self.up else "refused")

    def reachable(self) -> bool:
        return self.up

    async def inspect(self, container_id: str) -> None:
        if not self.up:
            raise EngineUnavailable("podman is not reachable")


async def test_a_recent_good_probe_admits_work_without_another() -> None:
    engine = Engine()
    runtime = InstanceRuntime(engine, "abc")  # type: ignore[arg-type]
    assert (await health_for_new_work(runtime)).ok and engine.probes == 1  # nothing known yet: probed
    for _ in range(5):
        assert (await health_for_new_work(runtime)).ok
    assert engine.probes == 1


async def test_an_engine_that_stopped_is_probed_and_refused_at_once() -> None:
    engine = Engine()
    runtime = InstanceRuntime(engine, "abc")  # type: ignore[arg-type]
    await runtime.health()
    engine.up = False  # its socket refuses now, though the last probe was good a moment ago
    health = await health_for_new_work(runtime)
    assert not health.ok and health.detail == "refused" and engine.probes == 2
    assert not (await health_for_new_work(runtime)).ok and engine.probes == 3, "a bad state is probed every time"
    engine.up = True
    assert (await health_for_new_work(runtime)).ok and engine.probes == 4
    assert (await health_for_new_work(runtime)).ok and engine.probes == 4


async def test_a_call_that_found_the_engine_away_or_a_stale_answer_means_a_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = Engine()
    runtime = InstanceRuntime(engine, "abc")  # type: ignore[arg-type]
    await runtime.health()
    engine.up = False
    with pytest.raises(EngineUnavailable):
        await runtime.inspect("c1")
    engine.up = True  # back, but the failed call made the last answer untrusted
    assert (await health_for_new_work(runtime)).ok and engine.probes == 2
    monkeypatch.setattr(instance, "TRUST_SECONDS", 0.0)  # an answer older than the trust period
    assert (await health_for_new_work(runtime)).ok and engine.probes == 3


def test_unix_socket_accepts_only_a_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "engine.sock")
    assert not unix_socket_accepts(path)  # no socket file
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        assert not unix_socket_accepts(path)  # bound, not listening: refused
        server.listen(1)
        assert unix_socket_accepts(path)
    assert not unix_socket_accepts(path)  # closed (the file remains): refused
