"""The table of settings: each one's environment names and the parser that turns YAML/env/flag values into it.

Values arrive as strings (environment, flags) or as YAML's native types; every parser accepts both and raises
ValueError with a message meant for an operator.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpud.presets import parse_size

DIFFICULTIES = ("low", "high")


@dataclass(frozen=True)
class FieldSpec:
    """How one setting is read: its environment names and its parser."""

    env: tuple[str, ...]
    parse: Callable[[Any], Any]
    secret: bool = False


def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return str(value).strip()


def optional_text(value: Any) -> str | None:
    """A string, or None when empty."""
    if value is None:
        return None
    return _text(value) or None


def non_empty_text(value: Any) -> str:
    """A string that must not be empty."""
    text = _text(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def boolean(value: Any) -> bool:
    """true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def seconds(value: Any) -> float:
    """A duration in seconds: a positive number."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return number


def positive_int(value: Any) -> int:
    """A whole number above zero."""
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be above zero, got {number}")
    return number


def optional_size(value: Any) -> int | None:
    """A byte size such as 200g, or none/empty for no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "0"}):
        return None
    return parse_size(value)


def path(value: Any) -> Path:
    """A filesystem path (must not be empty)."""
    return Path(non_empty_text(value))


def string_list(value: Any) -> tuple[str, ...]:
    """A YAML list or a comma-separated string; empty items are dropped."""
    items = value if isinstance(value, list) else _text(value).split(",")
    return tuple(text for text in (_text(item) for item in items) if text)


def gpu_ids(value: Any) -> tuple[int, ...]:
    """GPU indexes, e.g. `0,1` or [0, 1]; no duplicates, none negative."""
    ids = []
    for item in string_list(value) if not isinstance(value, int) else (str(value),):
        if not item.isdigit():
            raise ValueError(f"GPU ids are whole numbers >= 0, got {item!r}")
        ids.append(int(item))
    if len(set(ids)) != len(ids):
        raise ValueError("a GPU id is listed twice")
    return tuple(ids)


def difficulty_map(value: Any) -> dict[int, str]:
    """`0:low,1:high` or a YAML mapping {0: low, 1: high}."""
    pairs: list[tuple[Any, Any]]
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = []
        for item in string_list(value):
            gpu, sep, tag = item.partition(":")
            if not sep:
                raise ValueError(f"expected GPU:difficulty pairs such as 0:low,1:high, got {item!r}")
            pairs.append((gpu.strip(), tag.strip()))
    result: dict[int, str] = {}
    for gpu, tag in pairs:
        if not str(gpu).isdigit():
            raise ValueError(f"GPU ids are whole numbers >= 0, got {gpu!r}")
        if tag not in DIFFICULTIES:
            raise ValueError(f"difficulty of GPU {gpu} must be one of {', '.join(DIFFICULTIES)}, got {tag!r}")
        result[int(gpu)] = str(tag)
    return result


def listen_address(value: Any) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:8001`)."""
    text = non_empty_text(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def choice(*options: str) -> Callable[[Any], str]:
    """A parser accepting one of the given words."""

    def parse(value: Any) -> str:
        text = _text(value).lower()
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")
        return text

    return parse


def url(value: Any) -> str | None:
    """An http(s) URL, or None when empty."""
    text = optional_text(value)
    if text is not None and not text.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/") if text else None


def api_keys(value: Any) -> tuple[str, ...]:
    """One or more API keys (comma-separated, or a YAML list)."""
    return string_list(value)


def read_secret_file(file: Path) -> str:
    """A secret from a file: each non-empty line is one value (joined by commas for key lists)."""
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    return ",".join(line for line in lines if line)


FIELDS: dict[str, FieldSpec] = {
    "gpu_backend": FieldSpec(("GPUD_GPU_BACKEND",), choice("auto", "nvml", "static")),
    "gpu_device_ids": FieldSpec(("GPU_DEVICE_IDS",), gpu_ids),
    "gpu_device_difficulty": FieldSpec(("GPU_DEVICE_DIFFICULTY",), difficulty_map),
    "gpu_metrics_refresh_interval": FieldSpec(("GPU_METRICS_REFRESH_INTERVAL",), seconds),
    "session_idle_timeout_seconds": FieldSpec(("SESSION_IDLE_TIMEOUT_SECONDS",), seconds),
    "session_max_lifetime_seconds": FieldSpec(("SESSION_MAX_LIFETIME_SECONDS",), seconds),
    "session_queue_max_size": FieldSpec(("SESSION_QUEUE_MAX_SIZE",), positive_int),
    "default_task_timeout": FieldSpec(("DEFAULT_TASK_TIMEOUT",), seconds),
    "max_task_timeout": FieldSpec(("MAX_TASK_TIMEOUT",), seconds),
    "client_gone_grace_seconds": FieldSpec(("GPUD_CLIENT_GONE_GRACE_SECONDS",), seconds),
    "task_retention_seconds": FieldSpec(("GPUD_TASK_RETENTION_SECONDS",), seconds),
    "sse_heartbeat_seconds": FieldSpec(("GPUD_SSE_HEARTBEAT_SECONDS",), seconds),
    "model_cache_dir": FieldSpec(("MODEL_CACHE_DIR",), path),
    "model_cache_max_bytes": FieldSpec(("GPUD_MODEL_CACHE_MAX_BYTES",), optional_size),
    "auto_fetch_models": FieldSpec(("AUTO_FETCH_MODELS",), boolean),
    "file_service_url": FieldSpec(("FILE_SERVICE_URL",), url),
    "file_service_internal_key": FieldSpec(("FILE_SERVICE_INTERNAL_KEY",), optional_text, secret=True),
    "file_service_key_header": FieldSpec(("GPUD_FILE_SERVICE_KEY_HEADER",), non_empty_text),
    "presets_file": FieldSpec(("GPUD_PRESETS_FILE",), path),
    "runtime": FieldSpec(("GPUD_RUNTIME",), choice("podman", "docker", "process")),
    "runtime_socket": FieldSpec(("GPUD_RUNTIME_SOCKET",), optional_text),
    "allowed_docker_images": FieldSpec(("ALLOWED_DOCKER_IMAGES",), string_list),
    "http_listen": FieldSpec(("GPUD_HTTP_LISTEN",), listen_address),
    "admin_socket": FieldSpec(("GPUD_ADMIN_SOCKET",), path),
    "admin_socket_group": FieldSpec(("GPUD_ADMIN_SOCKET_GROUP",), optional_text),
    "state_dir": FieldSpec(("GPUD_STATE_DIR",), path),
    "internal_api_key": FieldSpec(("INTERNAL_API_KEY",), api_keys, secret=True),
    "metrics_public": FieldSpec(("GPUD_METRICS_PUBLIC",), boolean),
    "max_request_bytes": FieldSpec(("GPUD_MAX_REQUEST_BYTES",), parse_size),
    "log_level": FieldSpec(("GPUD_LOG_LEVEL",), choice("debug", "info", "warning", "error")),
}


def suggest(key: str) -> str | None:
    """The known key closest to a mistyped one, if any is close."""
    lowered = key.lower()
    by_env = {env.lower(): name for name, spec in FIELDS.items() for env in spec.env}
    if lowered in by_env:
        return by_env[lowered]
    matches = difflib.get_close_matches(lowered, list(FIELDS), n=1)
    return matches[0] if matches else None
