"""JSON that cannot hurt gpud: strict parsing of untrusted input, and values that always encode.

Python's json module accepts `NaN`/`Infinity`, turns `1e400` into infinity, yields lone surrogates from
`"\\ud800"`, and raises RecursionError or a plain ValueError (the 4300-digit integer limit) on hostile input.
Each of those once escaped as a 500, an unencodable event or a task that never finished. `loads_strict` refuses
them with one exception type; `sanitize`/`dumps_safe` make any value encodable (non-finite numbers become null,
lone surrogates U+FFFD), so encoding an event never raises.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

# Deeper nesting than this is refused on input and cut (to null) when sanitising.
MAX_DEPTH = 64

_MAX_INT_BITS = 14_000
_SURROGATE = re.compile("[\ud800-\udfff]")
# Looked for in the decoded text: bytes are decoded with "surrogatepass" (as json.loads does), so UTF-8-encoded
# surrogates (ED A0..BF xx, or UTF-16 code units) are lone surrogates in the text by then.
_MAYBE_SURROGATE_TEXT = re.compile("\\\\u[dD][89a-fA-F]|[\ud800-\udfff]")


class UnsafeJSON(ValueError):
    """Input JSON gpud refuses; the message says what is wrong with it."""


def _refuse_constant(name: str) -> Any:
    raise UnsafeJSON(f"{name} is not a number JSON allows (only finite numbers are accepted)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400, or 400 digits with a point: float() says infinity
        raise UnsafeJSON("a number is out of range (only finite numbers are accepted)")
    return value


# Made once: json.loads/json.dumps with any keyword build a new decoder/encoder per call, which was a third of
# gpud's time per streamed worker message. Both are stateless between calls (the C scanner clears its memo).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# JSONEncoder.encode also builds its C encoder per call; this one is made once. Without a circular-reference
# check (its `markers` would need a fresh dict per call): a cycle recurses until RecursionError, which dumps_safe
# answers by sanitising, as it does the ValueError the check would raise.
_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE = _MAKE_ENCODER and _MAKE_ENCODER(
    None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, False
)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_SPACE = re.compile(r"[ \t\n\r]*")  # json.decoder.WHITESPACE


def _text_of(raw: bytes | str) -> str:
    """The JSON text, decoded as json.loads decodes it (UTF-8/16/32 detected, surrogates passed; a BOM refused)."""
    if isinstance(raw, str):
        if raw.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", raw, 0)
        return raw
    if not isinstance(raw, bytes | bytearray):
        raise TypeError(f"the JSON object must be str, bytes or bytearray, not {type(raw).__name__}")
    # An object whose second byte is not NUL is what detect_encoding calls UTF-8: most messages skip its calls.
    utf8 = raw[:1] == b"{" and raw[1:2] != b"\x00"
    return raw.decode("utf-8" if utf8 else json.detect_encoding(raw), "surrogatepass")


def _decode(text: str) -> Any:
    """JSONDecoder.decode with the strict decoder, minus its method calls (same errors)."""
    try:
        value, end = _SCAN(text, 0 if text[:1] == "{" else _past_space(text, 0))
    except StopIteration as err:
        raise json.JSONDecodeError("Expecting value", text, err.value) from None
    if end != len(text):
        end = _past_space(text, end)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    return value


def _past_space(text: str, at: int) -> int:
    match = _SPACE.match(text, at)  # always matches (perhaps nothing)
    return match.end() if match is not None else at


def loads_strict(raw: bytes | str, *, max_depth: int = MAX_DEPTH, clean_strings: bool = False) -> Any:
    """Parse JSON, refusing non-finite numbers, lone surrogates and nesting deeper than `max_depth`.

    With `clean_strings`, lone surrogates are replaced by U+FFFD instead of refused (for peers whose text is
    passed on, not judged: workers)."""
    try:
        text = _text_of(raw)
        value = _decode(text)
    except UnsafeJSON:
        raise
    except RecursionError:
        raise UnsafeJSON(f"JSON is nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:
        raise UnsafeJSON(f"not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:  # JSONDecodeError, and the integer digit limit (a plain ValueError)
        raise UnsafeJSON(str(exc)) from None
    # Non-finite numbers were refused while parsing. Left to look for: nesting (not deeper than the text has
    # brackets) and lone surrogates (none without a \uD800-\uDFFF escape or such a code point): the walk over
    # the value is needed only when the text could hold either.
    surrogates = _may_hold_surrogates(text)
    if (surrogates and not clean_strings) or text.count("[") + text.count("{") > max_depth:
        problem = problem_of(value, max_depth, strings=not clean_strings)
        if problem:
            raise UnsafeJSON(problem)
    return sanitize(value, max_depth + 1) if clean_strings and surrogates else value


def _may_hold_surrogates(text: str) -> bool:
    """False when the JSON text cannot yield a lone surrogate (no \\uD800-\\uDFFF escape, no such code point)."""
    if "\\u" not in text and text.isascii():  # isascii() is O(1) on str: most messages end here
        return False
    return _MAYBE_SURROGATE_TEXT.search(text) is not None


def problem_of(value: Any, depth_left: int = MAX_DEPTH, *, strings: bool = True) -> str | None:
    """What makes a parsed value unacceptable (a non-finite number, a lone surrogate, too deep), or None;
    `strings=False` lets lone surrogates pass."""
    if isinstance(value, str):
        return None if not strings or is_clean(value) else "a string holds a lone UTF-16 surrogate (e.g. \\ud800)"
    if isinstance(value, float):
        return None if math.isfinite(value) else "a number is out of range (only finite numbers are accepted)"
    if isinstance(value, dict | list):
        if depth_left <= 0:
            return f"JSON is nested deeper than {MAX_DEPTH} levels"
        keys = [k for k in value if not is_clean(k)] if strings and isinstance(value, dict) else []
        if keys:
            return "a key holds a lone UTF-16 surrogate (e.g. \\ud800)"
        for item in value.values() if isinstance(value, dict) else value:
            problem = problem_of(item, depth_left - 1, strings=strings)
            if problem:
                return problem
    return None


def is_clean(text: str) -> bool:
    """Whether a string encodes as UTF-8 (holds no lone surrogate)."""
    return text.isascii() or _SURROGATE.search(text) is None


def clean_text(text: str) -> str:
    """The string with each lone surrogate replaced by U+FFFD."""
    return text if is_clean(text) else _SURROGATE.sub("\ufffd", text)


def sanitize(value: Any, depth: int = MAX_DEPTH) -> Any:
    """An encodable copy: non-finite floats become None, strings are cleaned, unknown types become strings,
    containers deeper than `depth` become None."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Python refuses to print integers over 4300 digits (about 14,000 bits): such a number cannot be JSON.
        return value if value.bit_length() < _MAX_INT_BITS else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict | list | tuple):
        if depth <= 0:
            return None
        if isinstance(value, dict):
            return {_key(k): sanitize(v, depth - 1) for k, v in value.items()}
        return [sanitize(v, depth - 1) for v in value]
    return clean_text(str(value))


def _key(key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool) and key.bit_length() >= _MAX_INT_BITS:
        return "?"
    return clean_text(str(key))


def _dumps(value: Any) -> bytes:
    if _C_ENCODE is None:  # no C accelerator (never on CPython)
        return _ENCODER.encode(value).encode()
    return "".join(_C_ENCODE(value, 0)).encode()


def dumps_safe(value: Any) -> bytes:
    """Compact UTF-8 JSON of any value; never raises for content (it is sanitised when it would)."""
    try:
        return _dumps(value)
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return _dumps(sanitize(value))
