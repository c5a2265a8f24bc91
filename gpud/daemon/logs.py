"""Logging to stderr: timestamps in a terminal, `<N>` syslog priority prefixes under journald; or JSON.

A log message often quotes what others control (a worker's error, a model id, a header). Control characters in
the message itself (CR, LF, ESC, ...) are escaped, so no such text can start a line that looks like gpud's own;
only a traceback or stack appended to a record keeps its lines, each of them indented.

With `log_format: json` each record is one JSON object on one line (`ts`, `level`, `logger`, `message`, and the
fields a call passes in `extra=`, such as `task_id` and `session_id`); JSON escapes every control character, a
traceback included, so a record never spans lines. Under journald the line keeps its `<N>` prefix, which journald
takes off, so the journal's MESSAGE is the JSON object alone.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

# syslog priorities by Python level, as sd-daemon(3) prefixes expect.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

# C0 controls (tab included: a terminal moves on it), DEL, C1 controls, and the Unicode line and paragraph
# separators some viewers break lines on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape (\\n, \\r, \\t, \\x1b, \\u2028)."""
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


class SafeFormatter(logging.Formatter):
    """A formatter whose records are one line each, apart from an attached traceback (indented)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The formatted record with its message's control characters escaped."""
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        """One line for the record; a traceback follows on lines of its own that all begin with whitespace, so
        even an exception message quoting a newline cannot pass for a record."""
        text = super().format(record)
        first, newline, rest = text.partition("\n")
        if not newline:
            return first
        lines = (escape_controls(line) for line in rest.split("\n"))
        return first + "\n" + "\n".join(line if line[:1].isspace() else "  " + line for line in lines)


class JournalFormatter(SafeFormatter):
    """`<6>gpud.daemon: message`: journald reads the priority and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        """Prefix every line of the record (tracebacks included) so journald keeps them at one priority."""
        priority = _PRIORITIES.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def journal_prefix(priority: int, environ: Mapping[str, str] | None = None) -> str:
    """`<N>` when stderr goes to the journal (JOURNAL_STREAM set), else nothing: for lines written before (or
    without) the logging set-up, such as a configuration error that stops gpud."""
    environ = os.environ if environ is None else environ
    return f"<{priority}>" if environ.get("JOURNAL_STREAM") else ""


# What every LogRecord carries; anything else on a record came from a call's `extra=` (taskName: Python 3.12+).
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts (UTC, RFC 3339), level, logger, message, the call's `extra`
    fields (task_id, session_id, ...), and a traceback as one string when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line (ASCII: every control character and non-ASCII character escaped)."""
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        entry: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class JournalJsonFormatter(JsonFormatter):
    """`<6>{"ts": ...}`: the JSON line with the priority journald reads (and strips)."""

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line behind its priority prefix."""
        return f"<{_PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


def _formatter(log_format: str, journal: bool) -> logging.Formatter:
    if log_format == "json":
        return JournalJsonFormatter() if journal else JsonFormatter()
    if journal:
        return JournalFormatter("%(name)s: %(message)s")
    return SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(level: str, environ: Mapping[str, str] | None = None, log_format: str = "text") -> None:
    """Configure the root logger once for the process: `text` lines or `json` objects on stderr."""
    environ = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(log_format, bool(environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # No format of gpud's shows where a record was made, nor its thread or process: not looking them up (a stack
    # walk and three lookups per record, the logging HOWTO's "Optimization") saves a tenth of every log call.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # aiohttp's access log is noisy per request; operators get request metrics instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the level at run time (reload)."""
    logging.getLogger().setLevel(level.upper())
