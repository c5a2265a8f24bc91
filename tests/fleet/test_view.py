"""The fleet view built from etcd keys: hosts, claims, tombstones, where a request goes, where new work may go."""

from __future__ import annotations

from gpud.fleet.etcd import KeyValue, WatchEvent, prefix_end
from gpud.fleet.view import FleetView, GpuState, HostRecord


def host(name: str, *gpus: GpuState) -> KeyValue:
    record = HostRecord(name, f"http://{name}:8001", "1", gpus, 1.0)
    return KeyValue(f"/gpud/hosts/{name}", record.to_json(), 1)


def claim(kind: str, item: str, owner: str) -> KeyValue:
    return KeyValue(f"/gpud/{kind}/{item}", owner.encode(), 1)


FREE_LOW = GpuState(0, "low", leased=False, drained=False, healthy=True)
BUSY_LOW = GpuState(0, "low", leased=True, drained=False, healthy=True)


def test_prefix_end_selects_the_prefix() -> None:
    assert prefix_end("/gpud/") == "/gpud0"


def test_claims_tombstones_and_lost_hosts() -> None:
    view = FleetView()
    view.load([host("a", FREE_LOW), host("b", BUSY_LOW), claim("sessions", "s1", "b")], revision=5)
    assert view.owner("sessions", "s1") == ("b", True)
    # The session ended on b: its claim goes, b stays: requests still go to b (it answers 410 itself).
    view.apply(WatchEvent("delete", KeyValue("/gpud/sessions/s1", b"", 6), claim("sessions", "s1", "b")))
    assert view.owner("sessions", "s1") == ("b", False)
    # b's lease expires: its record goes too.
    view.apply(WatchEvent("delete", KeyValue("/gpud/hosts/b", b"", 7), None))
    assert "b" not in view.hosts and view.owner("sessions", "s1") == ("b", False)
    assert view.revision == 7


def test_a_relisting_turns_vanished_claims_into_tombstones() -> None:
    view = FleetView()
    view.load([host("a"), claim("tasks", "t1", "a")], revision=1)
    view.load([host("b")], revision=9)
    assert view.owner("tasks", "t1") == ("a", False) and list(view.hosts) == ["b"]


def test_new_work_goes_to_hosts_with_a_free_healthy_undrained_gpu_of_the_tier() -> None:
    view = FleetView()
    drained = GpuState(0, "low", leased=False, drained=True, healthy=True)
    sick = GpuState(0, "low", leased=False, drained=False, healthy=False)
    two = (FREE_LOW, GpuState(1, "low", leased=False, drained=False, healthy=True))
    view.load([host("a", FREE_LOW), host("b", drained), host("c", sick), host("d", *two), host("e", BUSY_LOW)], 1)
    assert [h.host_id for h in view.hosts_with_free("low", exclude="a")] == ["d"]
    assert view.hosts_with_free("high", exclude="x") == []


def test_malformed_records_and_foreign_keys_are_ignored() -> None:
    view = FleetView()
    view.load([KeyValue("/gpud/hosts/x", b"not json", 1), KeyValue("/gpud/other/y", b"z", 1)], 1)
    assert view.hosts == {} and view.owner("sessions", "y") == (None, False)
