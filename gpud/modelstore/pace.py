"""How slow a model download may be: a minimum transfer rate over a sliding window, and a total deadline."""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class FetchPace:
    """Settings GPUD_MODEL_FETCH_MIN_RATE (bytes/s), _RATE_WINDOW (s) and _DEADLINE (s); None switches one off."""

    min_rate: int | None = 64 << 10
    window: float = 30.0
    deadline: float | None = 6 * 3600.0


class RateGuard:
    """Tracks one response body and says when it falls below min_rate: at any time t at least `window` seconds
    after the body began, the bytes received in (t - window, t] must reach min_rate x window. A service that
    trickles (slow loris) or stalls past its headers fails at a time known in advance, so the caller can arm a
    single timer and move it as bytes arrive, without polling."""

    def __init__(self, min_rate: int | None, window: float, start: float) -> None:
        self._need = min_rate * window if min_rate else None
        self._min_rate = min_rate
        self._window = window
        self._done = 0
        # (time, bytes received by then), oldest first. Only samples whose count is above what the window must
        # exceed matter: the needed count only grows, so older ones are dropped for good.
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(start, 0)])

    def record(self, now: float, done: int) -> None:
        """done bytes have been received by now."""
        self._done = done
        self._samples.append((now, done))
        if self._need is not None:
            floor = done - self._need
            while len(self._samples) > 1 and self._samples[0][1] <= floor:
                self._samples.popleft()

    def fail_at(self) -> float | None:
        """When the body fails the rate if no more bytes come (loop time), or None without a minimum rate."""
        if self._need is None:
            return None
        # The window ending at t = s + window starts at sample s, the first whose count the window must pass.
        return self._samples[0][0] + self._window

    def describe(self) -> str:
        """The error message for a body that fell below the rate."""
        return (
            f"download slower than {self._min_rate} bytes/s over {self._window:g}s"
            f" (GPUD_MODEL_FETCH_MIN_RATE, GPUD_MODEL_FETCH_RATE_WINDOW); {self._done} bytes received"
        )
