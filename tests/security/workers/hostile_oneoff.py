"""A hostile one-off command (stdlib only): prints `count` lines of `size` bytes to stdout (or stderr with
`stream: stderr`), each written and flushed whole, `delay` seconds apart, then exits 0. Input:
GPUD_TASK_INPUT_FILE."""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    """Print the flood the input asks for."""
    with open(os.environ["GPUD_TASK_INPUT_FILE"], encoding="utf-8") as fh:
        meta = json.load(fh)
    out = sys.stderr if meta.get("stream") == "stderr" else sys.stdout
    chunk = ("o" * int(meta.get("size", 1024 * 1024)) + "\n").encode()
    for _ in range(int(meta.get("count", 100))):
        out.buffer.write(chunk)
        out.buffer.flush()
        time.sleep(float(meta.get("delay", 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
