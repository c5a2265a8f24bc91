"""Finding 4 and its relatives: values that Python's json accepts but JSON (or UTF-8) does not, deep nesting, huge
numbers and odd header bytes, sent to a real `gpud run` by a client or by a hostile session worker.

Before the fix: `{"metadata": {"t": NaN}}` got 200 and a stream that never ended, the task stayed `running`,
DELETE answered 200 and changed nothing, the janitor logged every second; the same for "\\ud800" in metadata or a
worker's text. 100,000 `[`, metadata 990 deep, a 5000-digit timeout and `X-API-Key: \\xff` were 500s with
tracebacks; a worker's deeply nested message closed its socket but the task waited out its timeout; a newline in a
worker's error message forged a gpud log line; `progress` passed NaN and arbitrary fields through.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Iterator

import pytest

from tests.figures import Figures
from tests.security.hostile import (
    KEY,
    MODEL_ID,
    Frame,
    Host,
    body,
    call,
    end_session,
    parse_frames,
    post_raw,
    raw_request,
    start_host,
    submit,
)
from tests.waiting import wait_for

ONEOFF = b'"task_type": "oneoff", "model_id": "%s", "task_preset": "flood"' % MODEL_ID.encode()
FORGED = "2030-01-01 00:00:00,000 ERROR gpud.forged: FORGED LINE"


def submission(metadata: bytes) -> bytes:
    """A one-off submission whose metadata is the given raw JSON text."""
    return b"{" + ONEOFF + b', "metadata": ' + metadata + b"}"


BAD_BODIES = {
    "NaN in metadata": submission(b'{"t": NaN}'),
    "Infinity in metadata": submission(b'{"t": Infinity}'),
    "-Infinity in metadata": submission(b'{"t": -Infinity}'),
    "1e400 in metadata": submission(b'{"t": 1e400}'),
    "lone surrogate escape in metadata": submission(b'{"t": "\\ud800"}'),
    "lone surrogate as UTF-8 bytes": submission(b'{"t": "\xed\xa0\x80"}'),
    "lone surrogate in a key": submission(b'{"\\udc00": 1}'),
    "invalid UTF-8": submission(b'{"t": "\xff\xfe"}'),
    "metadata 990 deep": submission(b'{"a": ' * 990 + b"1" + b"}" * 990),
    "metadata 65 deep": submission(b"[" * 65 + b"]" * 65),
    "100,000 [": b"[" * 100_000,
    "5000-digit timeout": b"{" + ONEOFF + b', "timeout_seconds": 1' + b"0" * 5000 + b"}",
    "4000-digit timeout": b"{" + ONEOFF + b', "timeout_seconds": 1' + b"0" * 4000 + b"}",
}


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    started = start_host({"GPUD_CLIENT_GONE_GRACE_SECONDS": "2"})
    yield started
    started.close()


def assert_no_traceback(host: Host) -> None:
    """gpud logged no traceback and no unexpected error."""
    log = host.daemon.log
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_hostile_body_is_a_400(host: Host, figures: Figures, name: str) -> None:
    _, before = call(host, "GET", "/api/tasks")
    started = time.monotonic()
    status, raw = post_raw(host, BAD_BODIES[name])
    figures.record("hostile request bodies", f"{name}: status", status)
    figures.record("hostile request bodies", f"{name}: answered in", (time.monotonic() - started) * 1000, "ms")
    assert status == 400, raw[:500]
    error = json.loads(raw)["error"]
    assert error["code"] in {"invalid_json", "invalid_timeout_seconds"}, error
    _, after = call(host, "GET", "/api/tasks")
    assert after["tasks"] == before["tasks"], "a refused body leaves nothing behind"
    assert_no_traceback(host)


@pytest.mark.parametrize(
    "key", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xff" * 600], ids=["ff", "bad-utf8", "surrogate", "600xff"]
)
def test_undecodable_api_key_is_a_plain_401(host: Host, figures: Figures, key: bytes) -> None:
    raw = b"GET /api/tasks HTTP/1.1\r\nHost: gpud\r\nX-API-Key: " + key + b"\r\nConnection: close\r\n\r\n"
    status, answer = raw_request(host, raw)
    figures.record("hostile X-API-Key", f"{key[:8]!r}: status", status)
    assert 400 <= status < 500, answer[:300]
    if status == 401:
        assert json.loads(answer)["error"]["code"] == "unauthorized"
    assert_no_traceback(host)


UNPARSABLE = {
    "NUL in a header": b"GET /health HTTP/1.1\r\nHost: gpud\r\nX: a\x00b\r\n\r\n",
    "negative Content-Length": b"POST /api/tasks/submit HTTP/1.1\r\nHost: gpud\r\nContent-Length: -5\r\n\r\n",
    "header without a colon": b"GET /health HTTP/1.1\r\nHost: gpud\r\nno colon here\r\n\r\n",
}


def test_unparsable_requests_are_400_and_cannot_flood_the_log(host: Host, figures: Figures) -> None:
    before = len(host.daemon.log)
    for _ in range(100):
        for raw in UNPARSABLE.values():
            status, _ = raw_request(host, raw)
            assert status == 400
    written = host.daemon.log[before:]
    figures.record("unparsable requests", "log bytes for 300 requests", len(written.encode()), "B")
    assert "Traceback" not in written and written.count("unparsable HTTP request") <= 2, written[-2000:]


def stream_until_finish(host: Host, submission_body: dict[str, object], on_first: threading.Event) -> list[Frame]:
    """Submit and read the stream in this thread; `on_first` is set once the first frame arrived."""
    frames: list[Frame] = []
    conn = http.client.HTTPConnection("127.0.0.1", host.daemon.port, timeout=120)
    conn.request("POST", "/api/tasks/submit", body=json.dumps(submission_body), headers={"X-API-Key": KEY})
    response = conn.getresponse()
    buffer = bytearray()
    while chunk := response.read1(1 << 16):
        buffer += chunk
        frames.extend(parse_frames(buffer))
        if any(f.event == "worker" and f.data.get("status") == "working" for f in frames):
            on_first.set()
    conn.close()
    return frames


def test_worker_hostile_values_are_cleaned_and_the_task_finishes(host: Host, figures: Figures) -> None:
    attack = "worker NaN/surrogates/deep JSON/newlines"
    started = time.monotonic()
    frames = submit(host, body("hostile", attack="hostile_values"), timeout=60)
    elapsed = figures.record(attack, "task finished after", time.monotonic() - started, "s")
    end_session(host, frames)
    assert elapsed < 10
    finish = frames[-1]
    assert finish.event == "task_finish" and finish.data["status"] == "failed"
    # The error's code is a safe token; its message keeps its lines (it is JSON here) but is cut and cleaned.
    assert finish.data["error"] == {"code": "Boom_X", "message": f"failed\n{FORGED} "}
    progress = [f.data for f in frames if f.event == "progress"]
    assert progress == [{"done": 2, "total": None, "message": "half way", "task_id": finish.data["task_id"]}]
    (text,) = [f.data["text"] for f in frames if f.event == "text"]
    assert text == "lone \ufffd surrogate "
    logs = [(f.data["stream"], f.data["line"]) for f in frames if f.event == "logs"]
    assert ("std_err", "log \ufffd line") in logs
    problems = [line for stream, line in logs if stream == "gpud"]
    figures.record(attack, "protocol errors reported to the task", len(problems))
    assert len(problems) == 3, problems  # NaN, 1e400 and the nesting (a pong with a list id is just ignored)
    assert all(line.startswith("worker protocol error") for line in problems), problems
    assert any("nested deeper" in line for line in problems)
    status, task = call(host, "GET", f"/api/tasks/{finish.data['task_id']}")
    assert status == 200 and task["result"]["note"] == "\ufffd" and task["status"] == "failed"
    status, again = call(host, "DELETE", f"/api/tasks/{finish.data['task_id']}")
    assert status == 409 and again["error"]["code"] == "task_finished"
    assert_no_traceback(host)


def test_running_task_with_hostile_values_is_cancelled_by_delete(host: Host, figures: Figures) -> None:
    attack = "worker hostile values, then DELETE"
    working = threading.Event()
    result: list[list[Frame]] = []
    submission_body = body("hostile", attack="hostile_values", hang=True)
    reader = threading.Thread(
        target=lambda: result.append(stream_until_finish(host, submission_body, working)), daemon=True
    )
    reader.start()
    assert working.wait(30)
    _, listing = call(host, "GET", "/api/tasks")
    (running,) = [t for t in listing["tasks"] if t["status"] == "running"]
    started = time.monotonic()
    status, _ = call(host, "DELETE", f"/api/tasks/{running['task_id']}")
    assert status == 200
    reader.join(30)
    figures.record(attack, "stream ended after DELETE", time.monotonic() - started, "s")
    (frames,) = result
    end_session(host, frames)
    assert frames[-1].event == "task_finish" and frames[-1].data["status"] == "cancelled"
    assert_no_traceback(host)


def test_deep_json_then_closed_channel_fails_the_task_at_once(host: Host, figures: Figures) -> None:
    attack = "worker deep JSON, then socket closed"
    started = time.monotonic()
    frames = submit(host, {**body("hostile", attack="deep_then_close"), "timeout_seconds": 120}, timeout=60)
    elapsed = figures.record(attack, "task finished after", time.monotonic() - started, "s")
    end_session(host, frames)
    finish = frames[-1]
    assert finish.event == "task_finish" and finish.data["status"] == "failed"
    assert finish.data["error"]["code"] == "worker_crashed"
    assert elapsed < 15, "not the task's 120 s timeout"
    assert_no_traceback(host)


@pytest.mark.parametrize("journal", [False, True], ids=["terminal", "journald"])
def test_worker_text_cannot_forge_a_log_line(figures: Figures, journal: bool) -> None:
    host = start_host({"JOURNAL_STREAM": "8:12345"} if journal else {})
    try:
        frames = submit(host, body("hostile", attack="hostile_values"), timeout=60)
        end_session(host, frames)
        assert frames[-1].data["error"]["code"] == "Boom_X"
        wait_for(lambda: "Boom_X" in host.daemon.log, "the task's failure in gpud's log", 10)
        lines = host.daemon.log.splitlines()
        # Every line is a record (a timestamp, or a priority and a logger name) or a traceback's indented line.
        record_start = re.compile(r"<\d>[\w.]+: |<\d>  " if journal else r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} |  ")
        strays = [line for line in lines if not record_start.match(line)]
        forged = [line for line in lines if re.match(r"(<\d>)?2030-01-01", line)]
        kind = "journald" if journal else "terminal"
        figures.record("worker error with a newline", f"{kind}: stray or forged lines", len(strays) + len(forged))
        assert not strays and not forged, strays + forged
        (logged,) = [line for line in lines if "Boom_X" in line]
        assert f"failed\\n{FORGED} " in logged, logged
    finally:
        host.close()
