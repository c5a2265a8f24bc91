"""Rate-limited logging: one line per kind of message per interval, and a count of the repeats it held back.

Under a flood (thousands of refused connections, accept() failing on every loop turn) logging each event would
itself take the daemon down: the security review saw 389 MB of identical tracebacks in 70 s. A throttle lets the
first message of a kind through, counts the rest for `interval` seconds, then logs one line with the count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from aiohttp.http_exceptions import HttpProcessingError

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 10.0


@dataclass
class _Kind:
    """What the throttle remembers about one kind of message."""

    what: str
    last: float
    level: int
    held: int = 0
    flush: asyncio.TimerHandle | None = field(default=None, repr=False)


class LogThrottle:
    """Admits at most one message per key per interval; the held-back count is logged when the interval ends."""

    def __init__(
        self,
        log: logging.Logger | None = None,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log or logger
        self._interval = interval
        self._clock = clock
        self._kinds: dict[Hashable, _Kind] = {}

    def admit(self, key: Hashable, what: str, level: int = logging.WARNING) -> bool:
        """True: log this one now. False: it was counted, and the count is reported when the interval ends.

        `what` names the kind in the summary line ("refused connections on the public API"), logged at `level`.
        """
        now = self._clock()
        kind = self._kinds.get(key)
        if kind is None:
            self._kinds[key] = _Kind(what, now, level)
            return True
        if now - kind.last >= self._interval:
            self._report(kind, now)
            kind.last = now
            return True
        kind.held += 1
        if kind.flush is None:
            self._schedule_flush(kind, kind.last + self._interval - now)
        return False

    def held(self, key: Hashable) -> int:
        """How many messages of this kind are held back right now (for tests and summaries)."""
        kind = self._kinds.get(key)
        return kind.held if kind else 0

    def close(self) -> None:
        """Report what is still held back and cancel pending flushes (at shutdown)."""
        now = self._clock()
        for kind in self._kinds.values():
            self._report(kind, now)

    def _schedule_flush(self, kind: _Kind, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the count is reported with the next admitted message instead
        kind.flush = loop.call_later(max(0.0, delay), self._flush, kind)

    def _flush(self, kind: _Kind) -> None:
        kind.flush = None
        now = self._clock()
        if kind.held:
            self._report(kind, now)
            # The summary counts as this interval's line: the next message waits a full interval again.
            kind.last = now

    def _report(self, kind: _Kind, now: float) -> None:
        if kind.flush is not None:
            kind.flush.cancel()
            kind.flush = None
        if kind.held:
            self._log.log(
                kind.level, "%d more %s in the last %.0f s (logged at most once per %.0f s)",
                kind.held, kind.what, now - kind.last, self._interval,
            )  # fmt: skip
            kind.held = 0


class BadRequestFilter(logging.Filter):
    """For aiohttp's server logger: a request that cannot even be parsed (bad header characters, a malformed
    Content-Length, ...) is the client's fault, already answered with 400. aiohttp logs each at ERROR with a
    traceback, which any client could use to flood the log; this turns them into one throttled warning line."""

    def __init__(self, throttle: LogThrottle | None = None) -> None:
        super().__init__()
        self._throttle = throttle or LogThrottle()

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a bad-request record to a short warning, or drop it while throttled; others pass unchanged."""
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or (exc.code or 400) >= 500:
            return True
        if not self._throttle.admit("bad-request", "unparsable HTTP requests", logging.WARNING):
            return False
        reason = str(exc.message).splitlines()[0] if exc.message else type(exc).__name__
        record.msg, record.args = "refused an unparsable HTTP request (%s): %s", (record.getMessage(), reason)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True
