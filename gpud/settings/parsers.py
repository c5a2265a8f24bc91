"""Value parsers for settings: each turns a YAML, environment or flag value into a setting's type.

Values arrive as strings (environment, flags) or as YAML's native types; every parser accepts both and raises
ValueError with a message meant for an operator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpud.settings.images import ImagePolicy
from gpud.settings.presets import MAX_ID, parse_size

DIFFICULTIES = ("low", "high")


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


def seconds_or_zero(value: Any) -> float:
    """A duration in seconds: a positive number, or 0 (off)."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            if float(value) == 0:
                return 0.0
    return seconds(value)


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


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "0"})


def optional_seconds(value: Any) -> float | None:
    """A positive number of seconds, or none/empty/0 for no limit."""
    return None if _is_none(value) else seconds(value)


def optional_positive_int(value: Any) -> int | None:
    """A whole number above zero, or none/empty/0 for no limit."""
    return None if _is_none(value) else positive_int(value)


def optional_size(value: Any) -> int | None:
    """A byte size such as 200g, or none/empty for no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "0"}):
        return None
    return parse_size(value)


def path(value: Any) -> Path:
    """A filesystem path (must not be empty)."""
    return Path(non_empty_text(value))


def engine_socket(value: Any) -> str | None:
    """An engine's API socket: an absolute path, or `unix:///path` (the form CONTAINER_HOST and DOCKER_HOST use);
    returned as the bare path. None when empty."""
    text = optional_text(value)
    if text is None:
        return None
    socket_path = text[len("unix://") :] if text.lower().startswith("unix://") else text
    if "://" in socket_path or not socket_path.startswith("/"):
        raise ValueError(
            f"expected a Unix socket: an absolute path (/run/podman/podman.sock) or unix:///path, got {text!r}"
            " (gpud talks to the engine only over its local Unix socket)"
        )
    return socket_path


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


def id_range(value: Any) -> tuple[int, int]:
    """`first-last` host uids (inclusive), e.g. `2000000000-2000065535`; never including 0 (root)."""
    text = non_empty_text(value)
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"expected first-last (whole numbers), got {text!r}")
    low, high = int(first), int(last)
    if not 0 < low <= high <= MAX_ID:
        raise ValueError(f"expected 1 <= first <= last <= {MAX_ID}, got {text!r}")
    return low, high


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


def image_policy(value: Any) -> ImagePolicy:
    """ALLOWED_DOCKER_IMAGES: globs, comma-separated or a YAML list; digest pins are checked here, at load."""
    return ImagePolicy.parse(string_list(value))


def url_list(value: Any) -> tuple[str, ...]:
    """http(s) URLs, comma-separated or a YAML list (e.g. etcd endpoints); empty: none."""
    urls = tuple(url(item) for item in string_list(value))
    return tuple(u for u in urls if u)


def optional_path(value: Any) -> Path | None:
    """A filesystem path, or None when empty."""
    text = optional_text(value)
    return Path(text) if text else None
