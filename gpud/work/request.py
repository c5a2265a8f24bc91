"""The body of `POST /api/tasks/submit`, validated field by field with clear 400s."""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpud.errors import InvalidRequest
from gpud.jsonsafe import problem_of

# Ids gpud generates are 32 hex digits; a client may only echo them back, so anything else is malformed.
_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_METADATA_BYTES = 256 * 1024
_FIELDS = {"task_type", "task_difficulty", "model_id", "task_preset", "metadata", "timeout_seconds", "session_id"}


class TaskType(enum.StrEnum):
    """Where a task runs: a long-lived session worker or an ephemeral container."""

    SESSION = "session"
    ONEOFF = "oneoff"


@dataclass(frozen=True)
class TaskRequest:
    """A validated submission."""

    task_type: TaskType
    difficulty: str
    model_id: str
    preset: str
    timeout_seconds: float
    metadata: Mapping[str, Any] = field(default_factory=dict)
    session_id: str | None = None


# Re-encoded (ASCII escapes, spaced separators), JSON grows by at most this factor: a body up to MAX/this size
# cannot hold metadata over the limit, and is not encoded again to find out.
_GROWTH = 6


def parse_task_request(
    body: Mapping[str, Any], default_timeout: float, max_timeout: float, *, strict_json_bytes: int | None = None
) -> TaskRequest:
    """Validate a submission; raise InvalidRequest naming the first bad field. `strict_json_bytes`: the size of the
    JSON text `body` was parsed from by gpud's strict parser (the API's), whose values are acceptable already."""
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise _bad(unknown[0], f"unknown field {unknown[0]!r}")
    task_type = _enum(body, "task_type", TaskType, default=TaskType.SESSION if body.get("session_id") else None)
    difficulty = body.get("task_difficulty", "low")
    if difficulty not in ("low", "high"):
        raise _bad("task_difficulty", "task_difficulty must be 'low' or 'high'")
    model_id = _name(body, "model_id")
    preset = _name(body, "task_preset")
    metadata = body.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _bad("metadata", "metadata must be a JSON object")
    problem = None if strict_json_bytes is not None else problem_of(metadata)  # metadata may come from elsewhere
    if problem:
        raise _bad("metadata", f"metadata is not acceptable: {problem}")
    small = strict_json_bytes is not None and strict_json_bytes * _GROWTH <= MAX_METADATA_BYTES
    if not small and len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        raise _bad("metadata", f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    timeout = _timeout(body.get("timeout_seconds"), default_timeout, max_timeout)
    session_id = body.get("session_id")
    if session_id is not None:
        if not isinstance(session_id, str) or not _SESSION_ID_RE.match(session_id):
            raise _bad("session_id", "session_id must be an id returned by an earlier session task")
        if task_type is not TaskType.SESSION:
            raise _bad("session_id", "session_id is only valid with task_type 'session'")
    return TaskRequest(task_type, difficulty, model_id, preset, timeout, metadata, session_id)


def _bad(field_name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, code=f"invalid_{field_name}")


def _enum(body: Mapping[str, Any], key: str, kind: type[TaskType], default: TaskType | None) -> TaskType:
    value = body.get(key)
    if value is None:
        if default is None:
            raise _bad(key, f"{key} is required ({' or '.join(k.value for k in kind)})")
        return default
    try:
        return kind(value)
    except ValueError:
        raise _bad(key, f"{key} must be one of {', '.join(k.value for k in kind)}") from None


def _name(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(key, f"{key} is required and must be a string")
    if not _NAME_RE.match(value):
        raise _bad(key, f"{key} must match {_NAME_RE.pattern}")
    return value


def _timeout(value: Any, default: float, maximum: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad("timeout_seconds", "timeout_seconds must be a positive number")
    try:
        seconds = float(value)
    except OverflowError:  # an integer of hundreds of digits
        seconds = math.inf
    if not seconds > 0:
        raise _bad("timeout_seconds", "timeout_seconds must be a positive number")
    if seconds > maximum:
        shown = f"{seconds:g}" if math.isfinite(seconds) else "(a huge number)"
        raise _bad("timeout_seconds", f"timeout_seconds {shown} is more than MAX_TASK_TIMEOUT {maximum:g}")
    return seconds
