"""Fleet mode end to end: a real three-member etcd cluster (Debian's etcd-server, loopback ports) and three real
gpud processes a, b, c (process runtime, distinct loopback ports; GPUs 0:low, 1:high each)."""

from __future__ import annotations

import re
import time

import pytest

from tests.fleet.etcdcluster import EtcdCluster
from tests.fleet.fleethosts import (
    FLEET_KEY,
    LEASE_TTL,
    Fleet,
    finish,
    session_body,
    session_of,
    task_of,
)
from tests.integration.gpuctl_env import run_gpuctl
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


def forwarded_ok(fleet: Fleet, name: str) -> float:
    """gpud_fleet_forwarded_requests_total{result="ok"} on a host."""
    status, text = fleet.get(name, "/metrics")
    found = re.search(r'^gpud_fleet_forwarded_requests_total\{result="ok"\} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def leases(fleet: Fleet, name: str) -> dict[int, bool]:
    """GPU id -> leased, on a host."""
    status, body = fleet.get(name, "/api/gpus")
    assert status == 200, body
    return {g["id"]: g["leased"] for g in body["gpus"]}


def test_a_session_created_through_a_is_used_through_b_and_c(fleet: Fleet) -> None:
    status, first = fleet.submit("a", session_body(prompt="one"))
    assert status == 200 and finish(first)["status"] == "completed", first
    session_id = session_of(first)
    # At once (no wait for the claim to spread): b forwards to a, the stream comes back through b.
    status, second = fleet.submit("b", session_body(session_id=session_id, prompt="two"))
    assert status == 200 and finish(second)["status"] == "completed", second
    status, third = fleet.submit("c", session_body(session_id=session_id, prompt="three"))
    assert status == 200 and finish(third)["status"] == "completed", third
    for via, events in (("c", second), ("b", third)):
        status, task = fleet.get(via, f"/api/tasks/{task_of(events)}")
        assert status == 200 and task["result"]["load_count"] == 1, task  # the model was not loaded again
    status, session = fleet.get("c", f"/api/sessions/{session_id}")
    assert status == 200 and session["tasks_run"] == 3 and session["worker"]["load_count"] == 1, session
    assert session["gpu_id"] == 0 and leases(fleet, "b")[0] is False and leases(fleet, "c")[0] is False
    # Resuming a stream through another host keeps Last-Event-ID: only the events after it come back.
    last = third[-3].id
    status, text = fleet.daemon("b").request(
        "GET", f"/api/tasks/{task_of(third)}/events", headers={"X-API-Key": "test-key", "Last-Event-ID": str(last)}
    )
    assert status == 200
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == [e.id for e in third if e.id is not None and last is not None and e.id > last], (ids, last)
    assert forwarded_ok(fleet, "b") >= 3 and forwarded_ok(fleet, "c") >= 2
    status, body = fleet.get("a", "/api/fleet")
    by_host = {h["host_id"]: h for h in body["hosts"]}
    assert by_host["a"]["sessions"] == 1 and by_host["a"]["gpus"]["low"]["leased"] == 1, body
    shown = run_gpuctl(fleet.hosts["c"].socket, ["fleet"])
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines() if line[:2] in ("a ", "b ", "c ")}
    assert sorted(rows) == ["a", "b", "c"] and "low 0/1 free" in rows["a"] and "(this host)" in rows["c"], shown.stdout


def test_a_new_task_spills_to_another_host_when_the_local_tier_is_full(fleet: Fleet) -> None:
    status, first = fleet.submit("a", session_body())
    assert status == 200 and finish(first)["status"] == "completed"
    assert leases(fleet, "a") == {0: True, 1: False}  # a's only low GPU is held by that session
    status, spilled = fleet.submit("a", session_body())
    assert status == 200 and finish(spilled)["status"] == "completed", spilled
    owner = [name for name in ("b", "c") if leases(fleet, name)[0]]
    assert len(owner) == 1, "the second session runs on b or c"
    # The spilled session is used through a again (forwarded to its owner), and the third spills to the last host.
    status, again = fleet.submit("a", session_body(session_id=session_of(spilled)))
    assert status == 200 and finish(again)["status"] == "completed", again
    status, third = fleet.submit("a", session_body())
    assert status == 200 and finish(third)["status"] == "completed", third
    assert all(leases(fleet, name)[0] for name in ("a", "b", "c"))
    # Every low GPU of the fleet is held: a fourth gets the same 503 as on a single host.
    status, refused = fleet.submit("a", session_body())
    assert status == 503, refused


def test_a_killed_host_s_sessions_answer_410_within_the_lease_ttl(fleet: Fleet) -> None:
    status, events = fleet.submit("c", session_body())
    assert status == 200 and finish(events)["status"] == "completed"
    session_id = session_of(events)
    status, _ = fleet.get("a", f"/api/sessions/{session_id}")
    assert status == 200
    before = {name: leases(fleet, name) for name in ("a", "b")}
    fleet.kill9("c")
    killed = time.monotonic()

    def lost() -> dict[str, object] | None:
        status, body = fleet.get("a", f"/api/sessions/{session_id}")
        return body if status == 410 else None

    body = wait_for(lost, "a 410 for the dead host's session", timeout=LEASE_TTL + 10)
    took = time.monotonic() - killed
    assert body["error"]["code"] == "host_lost", body
    assert took <= LEASE_TTL + 2.0, f"410 after {took:.1f}s (lease TTL {LEASE_TTL}s)"
    # Each host learns of the loss from its own watch: until b's has delivered it, b still forwards to c, which
    # does not answer (503 fleet_host_unreachable, Retry-After). Nothing else may come back meanwhile.
    answers: list[tuple[int, str]] = []

    def refused_on_b() -> dict[str, object] | None:
        status, refused = fleet.submit("b", session_body(session_id=session_id))
        answers.append((status, "streamed" if status == 200 else refused["error"]["code"]))
        return refused if status == 410 else None

    refused = wait_for(refused_on_b, "a 410 through b too", timeout=5)
    assert refused["error"]["code"] == "host_lost", refused
    assert set(answers[:-1]) <= {(503, "fleet_host_unreachable")}, answers
    fleet.wait_hosts(["a", "b"], on=["a", "b"])
    # Nothing freed twice or taken over: a and b hold exactly what they held.
    assert {name: leases(fleet, name) for name in ("a", "b")} == before
    print(f"\nfleet: a dead host's session answered 410 host_lost {took:.2f}s after kill -9 (TTL {LEASE_TTL}s)")


def test_killing_one_etcd_member_changes_nothing(fleet: Fleet, etcd: EtcdCluster) -> None:
    status, first = fleet.submit("a", session_body())
    assert status == 200
    session_id = session_of(first)
    etcd.kill(etcd.members[0])  # the endpoint every host uses first
    time.sleep(LEASE_TTL + 1)  # a lease that was not renewed elsewhere would have expired by now
    fleet.wait_hosts(["a", "b", "c"])
    for name in ("a", "b", "c"):
        status, health = fleet.daemon(name).request("GET", "/health")
        assert status == 200 and health["fleet"]["reason"] is None, health
    status, used = fleet.submit("b", session_body(session_id=session_id))
    assert status == 200 and finish(used)["status"] == "completed", used
    status, spilled = fleet.submit("a", session_body())
    assert status == 200 and finish(spilled)["status"] == "completed", spilled
    # A session created now is known to the others at once, through the members left.
    status, third = fleet.submit("c", session_body(session_id=session_of(spilled)))
    assert status == 200 and finish(third)["status"] == "completed", third


def test_etcd_down_leaves_each_host_serving_its_own_work_then_it_rejoins(fleet: Fleet, etcd: EtcdCluster) -> None:
    status, first = fleet.submit("a", session_body())
    assert status == 200
    session_id = session_of(first)
    etcd.kill_all()

    def degraded(name: str) -> dict[str, object] | None:
        status, health = fleet.daemon(name).request("GET", "/health")
        return health if status == 503 else None

    for name in ("a", "b", "c"):
        health = wait_for(lambda n=name: degraded(n), f"{name} degraded", timeout=15)
        assert any(str(r).startswith("etcd_unreachable") for r in health["reasons"]), health  # type: ignore[union-attr]
    # Each host serves its own work: a's session, and new sessions on b and c.
    status, own = fleet.submit("a", session_body(session_id=session_id))
    assert status == 200 and finish(own)["status"] == "completed", own
    for name in ("b", "c"):
        status, events = fleet.submit(name, session_body())
        assert status == 200 and finish(events)["status"] == "completed", events
    etcd.restart_all()
    for name in ("a", "b", "c"):
        wait_for(lambda n=name: fleet.daemon(n).request("GET", "/health")[0] == 200, f"{name} ok again", timeout=30)
    fleet.wait_hosts(["a", "b", "c"])
    # The re-registered claims are back: b forwards a's session to a.
    status, again = fleet.submit("b", session_body(session_id=session_id))
    assert status == 200 and finish(again)["status"] == "completed", again


def test_a_wrong_fleet_key_is_refused_and_a_forwarded_request_is_never_forwarded_again(fleet: Fleet) -> None:
    status, first = fleet.submit("a", session_body())
    session_id = session_of(first)
    status, body = fleet.get("b", f"/api/sessions/{session_id}", headers={"X-Gpud-Fleet-Key": "wrong"})
    assert status == 403 and body["error"]["code"] == "fleet_key_invalid", body
    status, body = fleet.get("b", f"/api/sessions/{session_id}", headers={"X-Gpud-Fleet-Key": ""})
    assert status == 403, body
    # With the right key the request counts as forwarded: b answers itself (it has no such session).
    status, body = fleet.get("b", f"/api/sessions/{session_id}", headers={"X-Gpud-Fleet-Key": FLEET_KEY})
    assert status == 404, body
    # The fleet key is not an API key: without the client's key the request is refused.
    status, body = fleet.daemon("a").request(
        "GET", f"/api/sessions/{session_id}", headers={"X-Gpud-Fleet-Key": FLEET_KEY}
    )
    assert status == 401, body
