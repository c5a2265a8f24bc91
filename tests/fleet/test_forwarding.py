"""The forwarder's semantics end to end (a real etcd cluster, real gpud hosts a and b; the session lives on a, the
client talks to b): a client that leaves a relayed stream ends the owner's stream too (the owner then cancels the
task as it would for its own client), an owner that dies ends the client's stream at once, keep-alive connections
carry request after request both ways, and what the owner answers (status, headers, body) comes back unchanged."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import pytest

from tests.fleet.etcdcluster import EtcdCluster
from tests.fleet.fleethosts import API_KEY, Fleet, finish, parse_stream, session_body, session_of
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def pair(etcd: EtcdCluster) -> Iterator[Fleet]:
    """Hosts a and b; a task without a client is cancelled after 0.5 s."""
    hosts = Fleet(etcd)
    try:
        hosts.start("a", "b", env={"GPUD_CLIENT_GONE_GRACE_SECONDS": "0.5"})
        yield hosts
    finally:
        hosts.close()


def open_stream(hosts: Fleet, via: str, session_id: str, tokens: int, delay: float) -> http.client.HTTPResponse:
    """A slow session task submitted through `via`, its response open (head read)."""
    conn = http.client.HTTPConnection("127.0.0.1", hosts.daemon(via).port, timeout=30)
    body = json.dumps(session_body(session_id=session_id, max_tokens=tokens, delay=delay))
    conn.request("POST", "/api/tasks/submit", body=body, headers={"X-API-Key": API_KEY})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")
    return response


def read_events(response: http.client.HTTPResponse, count: int) -> str:
    """At least `count` whole events of a stream."""
    text = ""
    while text.count("\n\n") < count:
        text += response.read1(65536).decode()
    return text


def test_a_client_that_leaves_a_relayed_stream_ends_the_owner_s_stream(pair: Fleet) -> None:
    status, events = pair.submit("a", session_body())
    session_id = session_of(events)
    response = open_stream(pair, "b", session_id, tokens=2000, delay=0.02)  # 40 s if nobody stops it
    first = parse_stream(read_events(response, 3))
    task_id = first[0].data["task_id"]
    response.close()  # the client leaves b
    left = time.monotonic()

    def cancelled() -> dict[str, object] | None:
        status, task = pair.get("a", f"/api/tasks/{task_id}")
        return task if status == 200 and task["status"] == "cancelled" else None

    wait_for(cancelled, "the owner to cancel the task its client left", timeout=15)
    print(f"\nfleet: the owner cancelled a task {time.monotonic() - left:.2f}s after its forwarded client left "
          f"(grace 0.5 s)")  # fmt: skip


def test_an_owner_that_dies_ends_the_client_s_stream(pair: Fleet) -> None:
    status, events = pair.submit("a", session_body())
    session_id = session_of(events)
    response = open_stream(pair, "b", session_id, tokens=2000, delay=0.02)
    read_events(response, 3)
    pair.kill9("a")
    killed = time.monotonic()
    while response.read1(65536):  # returns b"" at the stream's end (clean or not)
        assert time.monotonic() - killed < 10, "the relayed stream outlived its owner"
    took = time.monotonic() - killed
    assert took < 2.0, took
    print(f"\nfleet: the client's relayed stream ended {took * 1000:.0f} ms after its owner was killed")


def test_keep_alive_both_ways_and_answers_unchanged(pair: Fleet) -> None:
    status, events = pair.submit("a", session_body())
    session_id = session_of(events)
    reference = http.client.HTTPConnection("127.0.0.1", pair.daemon("a").port, timeout=30)
    reference.request("GET", f"/api/sessions/{session_id}", headers={"X-API-Key": API_KEY})
    direct = reference.getresponse()
    direct_body = json.loads(direct.read())
    reference.close()
    conn = http.client.HTTPConnection("127.0.0.1", pair.daemon("b").port, timeout=30)
    for _ in range(20):  # one client connection to b, many requests, each forwarded to a (on kept-alive ones)
        conn.request("GET", f"/api/sessions/{session_id}", headers={"X-API-Key": API_KEY})
        answer = conn.getresponse()
        body = json.loads(answer.read())
        assert answer.status == 200 and body["session_id"] == direct_body["session_id"] == session_id, body
        assert answer.getheader("Content-Type") == direct.getheader("Content-Type")
        assert answer.getheader("Connection") is None  # kept alive
    # An error answer comes back as the owner gave it (status and JSON body), on the same connection.
    conn.request("DELETE", f"/api/tasks/{'0' * 32}", headers={"X-API-Key": API_KEY})
    answer = conn.getresponse()
    assert answer.status == 404 and json.loads(answer.read())["error"]["code"], answer.status
    conn.close()
    status, events = pair.submit("b", session_body(session_id=session_id))
    assert status == 200 and finish(events)["status"] == "completed", events
