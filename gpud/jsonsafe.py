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
from typing import Any

# Deeper nesting than this is refused on input and cut (to null) when sanitising.
MAX_DEPTH = 64

_MAX_INT_BITS = 14_000
_SURROGATE = re.compile("[\ud800-\udfff]")
# json.loads decodes bytes with "surrogatepass", so UTF-8-encoded surrogates (ED A0..BF xx) count as well.
_MAYBE_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_MAYBE_SURROGATE_TEXT = re.compile("\\\\u[dD][89a-fA-F]|[\ud800-\udfff]")


class UnsafeJSON(ValueError):
    """Input JSON gpud refuses; the message says what is wrong with it."""


def _refuse_constant(name: str) -> Any:
    raise UnsafeJSON(f"{name} is not a number JSON allows (only finite numbers are accepted)")


def loads_strict(raw: bytes | str, *, max_depth: int = MAX_DEPTH, clean_strings: bool = False) -> Any:
    """Parse JSON, refusing non-finite numbers, lone surrogates and nesting deeper than `max_depth`.

    With `clean_strings`, lone surrogates are replaced by U+FFFD instead of refused (for peers whose text is
    passed on, not judged: workers)."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except UnsafeJSON:
        raise
    except RecursionError:
        raise UnsafeJSON(f"JSON is nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:
        raise UnsafeJSON(f"not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:  # JSONDecodeError, and the integer digit limit (a plain ValueError)
        raise UnsafeJSON(str(exc)) from None
    problem = problem_of(value, max_depth, strings=not clean_strings)
    if problem:
        raise UnsafeJSON(problem)
    return sanitize(value, max_depth + 1) if clean_strings and _may_hold_surrogates(raw) else value


def _may_hold_surrogates(raw: bytes | str) -> bool:
    """False when the JSON text cannot yield a lone surrogate (no \\uD800-\\uDFFF escape, no such raw code)."""
    if isinstance(raw, str):
        return _MAYBE_SURROGATE_TEXT.search(raw) is not None
    return _MAYBE_SURROGATE_BYTES.search(raw) is not None


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


def dumps_safe(value: Any) -> bytes:
    """Compact UTF-8 JSON of any value; never raises for content (it is sanitised when it would)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return json.dumps(sanitize(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
