"""The benchmarks' session worker (stdlib + the gpud SDK), run inline as `python3 -c <this file>`.

Inline, because a preset's command can carry it into any runtime without rebuilding the worker image (files under
examples/workers/ are baked into the image). Task input: deltas (default 1) pieces of text, each sent as soon as it
is made; interval (seconds between them, default 0); stamp (true: each piece is `time.time()` when it was sent and a
newline, so a client can tell how long it took to arrive); start_at (epoch seconds to wait for before the first).
"""

import time

import gpud_worker


class BenchWorker:
    """Loads nothing; streams as the task asks."""

    def setup(self) -> dict:
        """Nothing to load: the cold start is the container's and the protocol's own."""
        return {"load_seconds": 0}

    def predict(self, input: dict, ctx: "gpud_worker.Context") -> None:
        """Send the deltas one by one (ctx.delta: no joined text kept, so 5000 pieces stay cheap)."""
        count = int(input.get("deltas", 1))
        interval = float(input.get("interval", 0))
        stamp = bool(input.get("stamp"))
        start_at = float(input.get("start_at", 0))
        if start_at and ctx.wait(max(0.0, start_at - time.time())):
            return
        for _ in range(count):
            ctx.delta(f"{time.time():.6f}\n" if stamp else "x")
            if interval and ctx.wait(interval):
                return


if __name__ == "__main__":
    gpud_worker.serve(BenchWorker)
