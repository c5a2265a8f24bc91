"""Property-based fuzzing of the public API, driven by docs/openapi.yaml: no request gets a 5xx or hangs.

A real `gpud run` (process runtime, the example workers, a cached model) takes requests for every public operation
of the document: bodies generated from the documented schema, arbitrary JSON (NaN, huge numbers, deep nesting,
odd unicode), raw bytes; path parameters and headers of any shape. Every response must be below 500 and complete
(streams to their end) within a bound; afterwards the daemon is healthy, logged no traceback and holds no GPU.
GPUD_FUZZ_EXAMPLES sets how many requests (default 400).
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.figures import Figures
from tests.integration.gpuctl_env import MODEL_ID, GpudHost, start_host
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
KEY = "test-key"
EXAMPLES = int(os.environ.get("GPUD_FUZZ_EXAMPLES", "400"))
# A response, streams included, must be complete within this (tasks are capped at MAX_TASK_TIMEOUT=3 s below).
RESPONSE_BOUND_SECONDS = 20.0

OPERATIONS = sorted(
    (method.upper(), path)
    for path, item in SPEC["paths"].items()
    if item.get("x-gpud-app") != "admin" and item.get("x-gpud-mode") != "fleet"
    for method in item
    if method in {"get", "post", "delete"}
)

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)


def dumps(value: Any) -> bytes:
    """JSON as Python writes it: NaN and Infinity come out as bare tokens, lone surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode()


real_submission = st.fixed_dictionaries(
    {
        "model_id": st.sampled_from([MODEL_ID, "no-such-model"]),
        "task_preset": st.sampled_from(["stream", "oneoff", "forbidden", "nope"]),
    },
    optional={
        "task_type": st.sampled_from(["session", "oneoff", "other"]) | json_leaf,
        "task_difficulty": st.sampled_from(["low", "high"]) | json_leaf,
        "timeout_seconds": st.floats(min_value=0.1, max_value=3) | json_leaf,
        "metadata": st.fixed_dictionaries(
            {}, optional={"max_tokens": st.integers(0, 50), "delay": st.floats(0, 0.01), "prompt": st.text()}
        )
        | json_value,
        "session_id": st.text(max_size=70) | json_leaf,
    },
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that fit the part of JSON Schema the document uses for request bodies."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return st.from_regex(schema["pattern"], fullmatch=True) if "pattern" in schema else st.text(max_size=40)
    if kind == "number":
        low = schema.get("exclusiveMinimum", schema.get("minimum"))
        return st.floats(min_value=low, exclude_min="exclusiveMinimum" in schema, allow_nan=False, max_value=1e9)
    if kind == "object" and "properties" in schema:
        properties = {name: from_schema(sub) for name, sub in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {name: s for name, s in properties.items() if name in required},
            optional={name: s for name, s in properties.items() if name not in required},
        )
    if kind == "object":
        return st.dictionaries(st.text(max_size=10), json_value, max_size=4)
    raise AssertionError(f"the fuzzer does not know schema {schema}: extend from_schema")


submission_schema = SPEC["components"]["schemas"]["TaskSubmission"]


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], percent: int = 60) -> st.SearchStrategy[Any]:
    """`common` in about `percent` of the draws, `rare` in the rest (so most requests get past the outer checks)."""
    return st.integers(0, 99).flatmap(lambda n: common if n < percent else rare)


bodies = mostly(
    real_submission.map(dumps),
    st.one_of(
        from_schema(submission_schema).map(dumps),
        json_value.map(dumps),
        st.binary(max_size=512),
        st.integers(1, 20_000).map(lambda depth: b"[" * depth),
        st.integers(1, 2_000).map(lambda depth: b'{"metadata": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"),
        st.integers(4000, 6000).map(lambda digits: b'{"timeout_seconds": 1' + b"0" * digits + b"}"),
    ),
)
# Header values as HTTP carries them (latin-1); the client library refuses surrounding whitespace itself.
latin1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40).map(
    str.strip
)
path_values = st.sampled_from(["", "x", "..", "%00", "a" * 300]) | st.text(max_size=60)
api_keys = mostly(st.just(KEY), st.sampled_from(["", "wrong", "\xff"]) | latin1, percent=80)
# How the document says a key may be sent (X-API-Key, Authorization: Bearer); other Authorization schemes too.
SCHEMES = SPEC["components"]["securitySchemes"]


def key_header(scheme: str, key: str) -> dict[str, str]:
    """The header carrying `key` the way the named security scheme (or a scheme gpud does not take) says."""
    if scheme == "basic":
        return {"Authorization": f"Basic {key}".strip()}
    spec = SCHEMES[scheme]
    if spec["type"] == "apiKey":
        return {spec["name"]: key}
    assert (spec["type"], spec.get("scheme")) == ("http", "bearer"), f"the fuzzer does not know scheme {spec}"
    return {"Authorization": f"Bearer {key}".strip()}  # an empty key: `Bearer` alone


@pytest.fixture(scope="module")
def host() -> Iterator[GpudHost]:
    env = {
        "DEFAULT_TASK_TIMEOUT": "2",
        "MAX_TASK_TIMEOUT": "3",
        "SESSION_IDLE_TIMEOUT_SECONDS": "1",
        "GPUD_CLIENT_GONE_GRACE_SECONDS": "1",
    }
    started = start_host(env)
    yield started
    started.close()


def request(host: GpudHost, method: str, path: str, headers: dict[str, str], body: bytes | None) -> int:
    """One request, its body read to the end; the status. Fails the test if it takes longer than the bound."""
    started = time.monotonic()
    url = f"http://127.0.0.1:{host.daemon.port}{path}"
    with requests.request(method, url, headers=headers, data=body, timeout=(5, 10), stream=True) as response:
        for _ in response.iter_content(64 * 1024):
            assert time.monotonic() - started < RESPONSE_BOUND_SECONDS, f"{method} {path} hangs"
        return response.status_code


@st.composite
def requests_for(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes | None]:
    method, template = draw(st.sampled_from(OPERATIONS))
    path = template
    for name in ("task_id", "session_id"):
        path = path.replace("{" + name + "}", urllib.parse.quote(draw(path_values), safe=""))
    scheme = draw(mostly(st.sampled_from(sorted(SCHEMES)), st.just("basic"), percent=90))
    headers = key_header(scheme, draw(api_keys)) if draw(st.booleans()) or method != "GET" else {}
    if draw(st.booleans()):
        headers["Last-Event-ID"] = draw(latin1)
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(["application/json", "text/plain"]) | latin1)
    body = draw(bodies) if method == "POST" else None
    return method, path, headers, body


def test_the_public_api_never_answers_5xx_or_hangs(host: GpudHost, figures: Figures) -> None:
    statuses: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests_for())
    def one(case: tuple[str, str, dict[str, str], bytes | None]) -> None:
        method, path, headers, body = case
        status = request(host, method, path, headers, body)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, f"{method} {path} {headers} {body!r:.300} -> {status}"

    started = time.monotonic()
    one()
    figures.record("fuzz (public API)", "requests", sum(statuses.values()))
    figures.record("fuzz (public API)", "seconds", time.monotonic() - started, "s")
    for status, count in sorted(statuses.items()):
        figures.record("fuzz (public API)", f"HTTP {status}", count)
    assert statuses.get(200), "no request got through to the handlers: the fuzzer tests nothing"

    def idle() -> bool:
        gpus = requests.get(f"http://127.0.0.1:{host.daemon.port}/api/gpus", headers={"X-API-Key": KEY}, timeout=5)
        return not any(gpu["leased"] for gpu in gpus.json()["gpus"])

    wait_for(idle, "every GPU to be free after the fuzzing", timeout=30)
    assert requests.get(f"http://127.0.0.1:{host.daemon.port}/health", timeout=5).status_code == 200
    assert "Traceback" not in host.daemon.log, host.daemon.log[-3000:]
