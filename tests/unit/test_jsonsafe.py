"""gpud.jsonsafe's fast paths keep its strictness: a decoder and encoder made once, the walk over a parsed value
skipped only when the text cannot hold what it looks for, and the worker protocol's text_delta shortcut."""

from __future__ import annotations

import json
import math
import random

import pytest

from gpud.jsonsafe import MAX_DEPTH, UnsafeJSON, dumps_safe, loads_strict
from gpud.worker.protocol import ProtocolError, decode, decode_delta, delta_prefix


def test_no_decoder_or_encoder_is_made_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    for cls in (json.JSONDecoder, json.JSONEncoder):
        original = cls.__init__

        def counting(self: object, *args: object, _original: object = original, **kwargs: object) -> None:
            made.append(type(self).__name__)
            _original(self, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(cls, "__init__", counting)
    for _ in range(100):
        loads_strict(b'{"type":"text_delta","delta":"x"}', clean_strings=True)
        dumps_safe({"delta": "x", "task_id": "t"})
    assert made == []


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_lone_surrogates_in_utf16_and_utf32_input_are_refused_or_cleaned(codec: str) -> None:
    raw = '{"a": ["x", "\ud800"]}'.encode(codec, "surrogatepass")
    with pytest.raises(UnsafeJSON, match="surrogate"):
        loads_strict(raw)
    assert loads_strict(raw, clean_strings=True) == {"a": ["x", "\ufffd"]}


def test_non_finite_numbers_are_refused_wherever_they_are() -> None:
    for raw in [b"1e400", b"[-1e400]", b'{"a": {"b": [1.5, 2e308]}}', b"[" + b"9" * 400 + b".5]"]:
        with pytest.raises(UnsafeJSON, match="out of range"):
            loads_strict(raw)
    assert loads_strict(b"[1.7976931348623157e308, -0.0, 1e-400]") == [1.7976931348623157e308, -0.0, 0.0]


def test_depth_is_judged_by_nesting_not_by_brackets_in_strings() -> None:
    deep = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert loads_strict(deep) is not None
    with pytest.raises(UnsafeJSON, match="nested deeper"):
        loads_strict(b"[" + deep + b"]")
    brackets = json.dumps({"text": "[{" * 500}).encode()  # many brackets, all inside a string
    assert loads_strict(brackets) == {"text": "[{" * 500}


def test_errors_and_whitespace_are_as_json_loads_has_them() -> None:
    assert loads_strict(b' \n{"a" : 1}\t ') == {"a": 1}
    assert loads_strict("  [1]  ") == [1]
    raws: list[bytes | str] = [b"", b" ", b'{"a":1} x', b"{", "\ufeff{}", b"\xff", b"NaN", b"[Infinity]"]
    for raw in raws:
        with pytest.raises(UnsafeJSON):
            loads_strict(raw)


def test_dumps_safe_matches_json_dumps_and_never_raises() -> None:
    values: list[object] = [{"a": [1, 2.5, None, True, "é\n\u2028"]}, "x", 3, [], {1: "k"}]
    for value in values:
        assert dumps_safe(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    cycle: list[object] = []
    cycle.append(cycle)
    for value in [cycle, {"n": math.nan}, "\udc00", 10**5000, {"b": b"bytes"}]:
        json.loads(dumps_safe(value))


def test_the_text_delta_shortcut_accepts_only_what_decode_accepts_and_reads_it_the_same() -> None:
    task_id = "0123456789abcdef0123456789abcdef"
    prefix = delta_prefix(task_id)
    rng = random.Random(14)
    alphabet = b'ab"\\}\n u0d8\xed\xa0\x80\xff{\t'
    lines = [prefix + bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) + b'"}' for _ in range(5000)]
    lines += [prefix + b'\\ud800x"}', prefix + b'x","extra":1}', prefix + b'x"} ', prefix + b'\\u00e9"}']
    taken = 0
    for line in lines:
        fast = decode_delta(line, prefix)
        if fast is None:
            continue
        taken += 1
        message = decode(line)  # the shortcut took it: decode must accept it too, with the same text
        assert message == {"type": "text_delta", "task_id": task_id, "delta": fast}, line
    assert taken > 500
    assert decode_delta(prefix + b'\\ud800x"}', prefix) == "\ufffdx"
    assert decode_delta(prefix + b'x","extra":1}', prefix) is None
    assert decode_delta(delta_prefix("other") + b'x"}', prefix) is None
    with pytest.raises(ProtocolError):
        decode(prefix + b'a\nb"}')
    assert decode_delta(prefix + b'a\nb"}', prefix) is None  # a raw newline: not a valid string, decode reports it
