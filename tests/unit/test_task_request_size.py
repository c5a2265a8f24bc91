"""Metadata size and acceptability in parse_task_request, with and without the API's shortcut (a body the strict
parser read, small enough that its metadata cannot be over the limit re-encoded, is not encoded again)."""

from __future__ import annotations

import json

import pytest

from gpud.errors import InvalidRequest
from gpud.jsonsafe import loads_strict
from gpud.work.request import _GROWTH, MAX_METADATA_BYTES, parse_task_request

BASE = {"model_id": "m", "task_type": "oneoff", "task_preset": "p"}


def parsed(raw: bytes, shortcut: bool) -> object:
    """parse_task_request on a body as the API reads it (strict JSON), told its size or not."""
    body = loads_strict(raw)
    return parse_task_request(body, 60, 3600, strict_json_bytes=len(raw) if shortcut else None)


@pytest.mark.parametrize("shortcut", [True, False])
def test_metadata_over_the_limit_is_refused_either_way(shortcut: bool) -> None:
    raw = json.dumps({**BASE, "metadata": {"text": "x" * MAX_METADATA_BYTES}}).encode()
    with pytest.raises(InvalidRequest) as refused:
        parsed(raw, shortcut)
    assert refused.value.code == "invalid_metadata"


@pytest.mark.parametrize(
    "metadata",
    [
        {"n": [9e15] * 2000},  # "9e15" re-encodes as "9000000000000000.0": 4.5 times its text
        {"s": "é" * 4000},  # 2 bytes of UTF-8 each, 6 as \\u00e9
        {"s": "😀" * 2000},  # 4 bytes each, 12 as a surrogate pair of escapes
        {"a": [0] * 8000},  # "0," re-encodes as "0, "
        {"k": {"k": {"k": {"k": 1e-7}}}},  # "1e-7" re-encodes as "1e-07"
    ],
)
def test_a_body_under_the_shortcut_size_never_re_encodes_over_growth_times_its_size(metadata: dict) -> None:
    raw = json.dumps({**BASE, "metadata": metadata}, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(json.dumps(loads_strict(raw)["metadata"])) <= _GROWTH * len(raw)


def test_the_shortcut_applies_only_to_bodies_small_enough() -> None:
    # Just over MAX / GROWTH: encoded again (and here within the limit, so accepted).
    raw = json.dumps({**BASE, "metadata": {"text": "x" * (MAX_METADATA_BYTES // _GROWTH)}}).encode()
    assert parsed(raw, True) == parsed(raw, False)


def test_metadata_from_elsewhere_is_still_checked_for_unencodable_values() -> None:
    body = {**BASE, "metadata": {"x": float("nan")}}  # what the strict parser never yields, but a caller might
    with pytest.raises(InvalidRequest) as refused:
        parse_task_request(body, 60, 3600)
    assert refused.value.code == "invalid_metadata"
