"""gpuctl's pure parts: SSE parsing, socket choice, tables, times, sizes, colour rules, metadata parsing."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import click
import pytest

from gpuctl.client import DEFAULT_SOCKET, SocketChoice, parse_sse, resolve_socket
from gpuctl.output import Style, ago, colour_enabled, duration, size, table
from gpuctl.unixhttp import quote_segment
from gpuctl.work import parse_meta


def test_parse_sse_frames_comments_and_partial_tail() -> None:
    raw = [
        b": heartbeat\n",
        b"id: 1\n",
        b"event: text_delta\n",
        b'data: {"delta": "a"}\n',
        b"\n",
        b"id: 2\r\n",
        b"event: task_finish\r\n",
        b'data: {"status":\r\n',
        b'data: "completed"}\r\n',
        b"\r\n",
        b"id: 3\n",
        b"event: text_delta\n",
        b'data: {"delta": "torn"',  # a frame cut off by a dropped connection is never yielded
    ]
    events = list(parse_sse(raw))
    assert [(e.id, e.event, e.data) for e in events] == [
        (1, "text_delta", {"delta": "a"}),
        (2, "task_finish", {"status": "completed"}),
    ]
    assert events[0].to_dict() == {"id": 1, "event": "text_delta", "data": {"delta": "a"}}


def test_socket_precedence(tmp_path: Path) -> None:
    env = {"GPUD_SOCKET": "/env.sock", "XDG_RUNTIME_DIR": str(tmp_path)}
    assert resolve_socket("/flag.sock", env) == SocketChoice("/flag.sock", "--socket")
    assert resolve_socket(None, env) == SocketChoice("/env.sock", "GPUD_SOCKET")
    assert resolve_socket(None, {"XDG_RUNTIME_DIR": str(tmp_path)}).path == DEFAULT_SOCKET  # no dev socket there


def test_table_aligns_coloured_cells() -> None:
    style = Style(enabled=True)
    out = table(["A", "STATE", "B"], [["x", style.state("ready"), "1"], ["longer", "failed", "2"]])
    plain = out.replace("\x1b[32m", "").replace("\x1b[0m", "")
    assert plain.splitlines() == ["A       STATE   B", "x       ready   1", "longer  failed  2"]
    assert "\x1b[32mready\x1b[0m" in out
    assert Style(enabled=False).state("ready") == "ready"


def test_times_and_sizes() -> None:
    assert duration(0.3) == "0.3s" and duration(None) == "-"
    assert [duration(s) for s in (12, 75, 600, 3600, 3700, 90000)] == ["12s", "1m15s", "10m", "1h", "1h1m", "1d1h"]
    assert ago(1000.0, now=1180.0) == "3m ago" and ago(1300.0, now=1000.0) == "in 5m" and ago(None) == "-"
    assert ago(1000.0, now=1000.5) == "just now"
    assert [size(n) for n in (None, 57, 1536, 16 * 1024**3)] == ["-", "57B", "1.5Ki", "16Gi"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_for_terminals_without_no_color() -> None:
    assert colour_enabled(_Tty(), {}) is True
    assert colour_enabled(_Tty(), {"NO_COLOR": "1"}) is False
    assert colour_enabled(_Tty(), {"NO_COLOR": ""}) is True  # no-color.org: only a non-empty value counts
    assert colour_enabled(io.StringIO(), {}) is False


def test_meta_values_are_json_when_they_parse() -> None:
    meta = parse_meta(["max_tokens=30", "prompt=hello world", "flag=true", 'quoted="42"', "list=[1,2]", "empty="])
    assert meta == {
        "max_tokens": 30,
        "prompt": "hello world",
        "flag": True,
        "quoted": "42",
        "list": [1, 2],
        "empty": "",
    }
    with pytest.raises(click.BadParameter):
        parse_meta(["novalue"])


def test_quote_segment_is_urllib_quote_without_the_import() -> None:
    for value in ["abc", "a b/c?d#e", "\u00fcn\u00ef/\u2603", "~._-", "%41", "", "x" * 64, "a+b=c&d"]:
        assert quote_segment(value) == urllib.parse.quote(value, safe=""), value


def test_gpuctl_start_up_imports_only_what_it_needs() -> None:
    """What `import gpuctl.cli` loads, without site's own imports (as an installed gpuctl: no editable finder)."""
    code = f"import sys; sys.path[:0] = {sys.path!r}; import gpuctl.cli, json; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, check=True).stdout))
    heavy = {"urllib.parse", "http.client", "asyncio", "aiohttp", "ssl", "email", "pathlib", "gpuctl.render"}
    assert not loaded & heavy, loaded & heavy
    assert [m for m in loaded if m.startswith("gpud")] == ["gpud"], "only gpud/__init__ (the version constant)"
