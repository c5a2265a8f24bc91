"""Human output for gpuctl: aligned tables, relative times, sizes, optional colour; and stable JSON."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

# ANSI SGR codes for the few words gpuctl colours (states and health).
_COLOURS = {"green": "32", "yellow": "33", "red": "31", "dim": "2", "bold": "1"}
_STATE_COLOURS = {
    "ok": "green",
    "ready": "green",
    "completed": "green",
    "running": "green",
    "working": "yellow",
    "starting": "yellow",
    "queued": "yellow",
    "stopping": "yellow",
    "degraded": "red",
    "failed": "red",
    "timeout": "red",
    "cancelled": "red",
    "drained": "yellow",
    "stopped": "dim",
}


def colour_enabled(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set to anything non-empty (no-color.org)."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@dataclass(frozen=True)
class Style:
    """Wraps words in ANSI colours when enabled, else returns them unchanged."""

    enabled: bool

    def paint(self, text: str, colour: str) -> str:
        """`text` in the named colour."""
        if not self.enabled or colour not in _COLOURS:
            return text
        return f"\x1b[{_COLOURS[colour]}m{text}\x1b[0m"

    def state(self, text: str) -> str:
        """A state word coloured by what it means (green good, yellow busy, red bad)."""
        return self.paint(text, _STATE_COLOURS.get(text, ""))


def _visible_len(text: str) -> int:
    """Length without ANSI escapes, so coloured cells still line up."""
    length, i = 0, 0
    while i < len(text):
        if text[i] == "\x1b":
            end = text.find("m", i)
            i = end + 1 if end != -1 else len(text)
            continue
        length += 1
        i += 1
    return length


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, the last column unpadded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], _visible_len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = [cell + " " * (widths[i] - _visible_len(cell)) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def duration(seconds: float | None) -> str:
    """A short human duration: 0.3s, 45s, 3m, 2h5m, 3d4h."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{max(0.0, seconds):.1f}s"  # short tasks: tenths matter
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m" if minutes >= 10 or not secs else f"{minutes}m{secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def ago(timestamp: float | None, now: float | None = None) -> str:
    """A wall-clock timestamp relative to now: "3m ago", "in 5m", "just now", or "-"."""
    if timestamp is None:
        return "-"
    delta = (time.time() if now is None else now) - timestamp
    if abs(delta) < 1:
        return "just now"
    return f"{duration(delta)} ago" if delta > 0 else f"in {duration(-delta)}"


def size(num_bytes: int | None) -> str:
    """Bytes in binary units: 512B, 1.5Ki, 16Gi."""
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "Ki", "Mi", "Gi", "Ti"):
        if abs(value) < 1024 or unit == "Ti":
            text = f"{int(value)}" if unit == "B" or value == int(value) else f"{value:.1f}"
            return text + unit
        value /= 1024
    return f"{num_bytes}B"  # unreachable: the loop returns at Ti


def short_id(value: str | None, length: int = 12) -> str:
    """Ids trimmed like container ids in `podman ps`; full ids stay available with -o json or `show`."""
    return "-" if not value else value[:length]


def cell(value: Any) -> str:
    """Any value as a table cell ("-" for None/empty)."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def dump_json(value: Any, stream: TextIO | None = None) -> None:
    """Pretty, key-sorted JSON (stable for diffs and scripts) followed by a newline."""
    out = stream or sys.stdout
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def json_line(value: Any, stream: TextIO | None = None) -> None:
    """One compact JSON object per line (streams: events, logs), flushed so pipes see it at once."""
    out = stream or sys.stdout
    out.write(json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n")
    out.flush()


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """`key: value` lines with the values aligned (for `show` commands)."""
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in pairs)
