"""`gpud run --log-format json`: every line gpud writes to stderr is one JSON object (ts, level, logger, message),
and each task gets a start and a finish line carrying its ids, type, model, GPU, durations and status. The
formatter itself: tracebacks and control characters stay inside the one line, `extra` fields become keys, and under
journald the line keeps its priority prefix."""

from __future__ import annotations

import datetime
import json
import logging
import signal
import sys
from typing import Any

import pytest

from gpud.daemon.logs import JournalJsonFormatter, JsonFormatter
from tests.integration.gpuctl_env import MODEL_ID, start_host
from tests.monitoring.shipped import run_task
from tests.waiting import wait_for

KEY = {"X-API-Key": "test-key"}


def parse_lines(log: str) -> list[dict[str, Any]]:
    """Every stderr line as a JSON object (fails on the first line that is not one)."""
    entries = []
    for number, line in enumerate(log.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}")
        assert isinstance(entry, dict) and {"ts", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


def test_json_logs_from_a_real_daemon_with_task_start_and_finish_lines() -> None:
    host = start_host(args=["--log-format", "json"])
    try:
        base = {"model_id": MODEL_ID, "task_difficulty": "low"}
        oneoff = run_task(host.daemon, {**base, "task_type": "oneoff", "task_preset": "oneoff"}, KEY)
        session = run_task(host.daemon, {**base, "task_type": "session", "task_preset": "stream"}, KEY)
        ids = {"oneoff": oneoff["task_finish"]["task_id"], "session": session["task_finish"]["task_id"]}
        wait_for(lambda: all(f'"task_finish", "task_id": "{i}"' in host.daemon.log for i in ids.values()), "finishes")
        host.daemon.signal(signal.SIGTERM)
        assert host.daemon.wait() == 0
        entries = parse_lines(host.daemon.log)
    finally:
        host.close()
    assert len(entries) > 10 and {e["logger"] for e in entries} >= {"gpud.daemon.run", "gpud.work.task"}
    for entry in entries:
        assert entry["level"] in {"debug", "info", "warning", "error", "critical"}, entry
        assert datetime.datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).tzinfo is not None
    session_id = session["connection"]["session_id"]
    for task_type, task_id in ids.items():
        mine = [e for e in entries if e.get("task_id") == task_id and e.get("event") in ("task_start", "task_finish")]
        assert [e["event"] for e in mine] == ["task_start", "task_finish"], mine
        start, finish = mine
        for entry in mine:
            assert entry["type"] == task_type and entry["model"] == MODEL_ID and entry["gpu_id"] == 0, entry
            assert entry["session_id"] == (session_id if task_type == "session" else None), entry
            assert task_id in entry["message"]
        assert start["status"] == "running" and start["queue_wait_seconds"] >= 0
        assert finish["status"] == "completed" and finish["level"] == "info"
        reported = (oneoff if task_type == "oneoff" else session)["task_finish"]
        assert finish["elapsed_seconds"] == reported["elapsed_seconds"]
        for name, seconds in reported["timings"].items():
            assert finish[name] == seconds, (name, finish, reported)
        assert finish["run_seconds"] is not None and finish["queue_wait_seconds"] == start["queue_wait_seconds"]


def test_a_log_format_gpud_does_not_know_is_a_configuration_error(daemon_factory: Any) -> None:
    daemon = daemon_factory(env={"GPUD_LOG_FORMAT": "xml"}).start(wait=False)
    assert daemon.wait() == 2
    assert "GPUD_LOG_FORMAT" in daemon.log and "log_format" in daemon.log


def record(message: str, level: int = logging.INFO, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("gpud.test", level, __file__, 1, message, ("arg\n2030-01-01 forged",), None)
    rec.__dict__.update(extra)
    return rec


def test_one_json_line_per_record_whatever_it_carries() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        failed = record("worker said %s \x1b[31m\u2028", logging.ERROR, task_id="t1", session_id=None)
        failed.exc_info = sys.exc_info()
    line = JsonFormatter().format(failed)
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line
    entry = json.loads(line)
    assert entry["message"] == "worker said arg\n2030-01-01 forged \x1b[31m\u2028"
    assert entry["level"] == "error" and entry["logger"] == "gpud.test"
    assert entry["task_id"] == "t1" and entry["session_id"] is None
    assert "RuntimeError: boom\nsecond line" in entry["exception"] and "Traceback" in entry["exception"]
    assert entry["ts"].endswith("Z")
    # An extra value JSON cannot hold is written as text, not dropped with the record.
    assert json.loads(JsonFormatter().format(record("%s", path=object())))["path"].startswith("<object")


def test_journald_keeps_the_priority_in_front_of_the_json() -> None:
    line = JournalJsonFormatter().format(record("x %s", logging.WARNING))
    assert line.startswith('<4>{"ts": ')
    assert json.loads(line[3:])["level"] == "warning"
