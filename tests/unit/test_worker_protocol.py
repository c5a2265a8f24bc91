"""Wire format: encode/decode round trips, clear errors, and line framing with oversized lines."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from gpud.worker import sdk
from gpud.worker.protocol import MAX_MESSAGE_SIZE, PROTOCOL_VERSION, LineFramer, ProtocolError, decode, encode


def test_round_trip_keeps_unicode_and_newlines_inside_one_line() -> None:
    message = {"type": "text_delta", "task_id": "t1", "delta": "line one\nline two\r\n\u2028 ünï 🚀"}
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == message


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"no_type": 1}', "no string 'type'"),
        (b'{"type": 5}', "no string 'type'"),
    ],
)
def test_decode_errors_are_clear(line: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode(line)


def test_encode_rejects_untyped_unserializable_and_oversized() -> None:
    with pytest.raises(ProtocolError, match="type"):
        encode({"task_id": "x"})
    with pytest.raises(ProtocolError, match="not JSON-serializable"):
        encode({"type": "result", "output": object()})
    with pytest.raises(ProtocolError, match="not JSON-serializable"):
        encode({"type": "progress", "done": float("nan")})
    with pytest.raises(ProtocolError, match="over 100"):
        encode({"type": "text", "text": "x" * 200}, max_size=100)
    with pytest.raises(ProtocolError, match="over 10"):
        decode(b'{"type":"text","text":"xxxxxxxx"}', max_size=10)


def test_framer_splits_lines_across_chunks() -> None:
    framer = LineFramer(64)
    assert framer.feed(b'{"type":"a"}\n{"ty') == [b'{"type":"a"}']
    assert framer.pending == 4
    assert framer.feed(b'pe":"b"}\n\n') == [b'{"type":"b"}', b""]
    assert framer.pending == 0


def test_framer_skips_an_oversized_line_once_and_resyncs() -> None:
    framer = LineFramer(16)
    out = framer.feed(b"x" * 10)
    assert out == []
    out = framer.feed(b"y" * 10)  # now 20 bytes without a newline: reported and dropped
    assert len(out) == 1 and isinstance(out[0], ProtocolError)
    assert framer.feed(b"z" * 50) == []  # still the same line: not reported again
    assert framer.feed(b'zz\n{"type":"ok"}\n') == [b'{"type":"ok"}']


def test_framer_oversized_complete_line_in_one_chunk() -> None:
    framer = LineFramer(16)
    out = framer.feed(b"a" * 15 + b"\n" + b"b" * 20 + b"\nc\n")
    assert out[0] == b"a" * 15  # exactly at the limit, newline included
    assert isinstance(out[1], ProtocolError)
    assert out[2] == b"c"


def test_sdk_matches_the_host_constants_and_encoding() -> None:
    # The SDK is a standalone copy; these must never drift apart.
    assert sdk.PROTOCOL_VERSION == PROTOCOL_VERSION
    assert sdk.MAX_MESSAGE_SIZE == MAX_MESSAGE_SIZE
    message = {"type": "log", "task_id": "t", "stream": "stderr", "line": "a\nb"}
    assert sdk._encode(message) == encode(message)
    assert json.loads(sdk._encode(message)) == message


def test_sdk_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(sdk.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert names, "expected some imports"
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names - set(sys.stdlib_module_names)
