"""Logging to stderr: timestamps in a terminal, `<N>` syslog priority prefixes under journald."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

# syslog priorities by Python level, as sd-daemon(3) prefixes expect.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """`<6>gpud.daemon: message`: journald reads the priority and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        """Prefix every line of the message (tracebacks included) so journald keeps them at one priority."""
        priority = _PRIORITIES.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def setup_logging(level: str, environ: Mapping[str, str] | None = None) -> None:
    """Configure the root logger once for the process."""
    environ = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    if environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # aiohttp's access log is noisy per request; operators get request metrics instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the level at run time (reload)."""
    logging.getLogger().setLevel(level.upper())
