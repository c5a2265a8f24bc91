"""Example one-off command: plain stdlib, no SDK. Reads its input, prints tokens, exits with a chosen code.

Input: the JSON file named by GPUD_TASK_INPUT_FILE (mode 0400, this worker's uid only). Fields: prompt (its words
are the tokens, else token-0..), max_tokens (default 5), delay (seconds between lines), sleep (seconds to sleep
before exiting: for timeout tests), exit_code (default 0).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def read_input() -> dict[str, Any]:
    """The task's metadata, from the file gpud wrote (never the environment, which others may read)."""
    path = os.environ.get("GPUD_TASK_INPUT_FILE")
    raw = ""
    if path:
        with open(path, encoding="utf-8") as fh:
            raw = fh.read()
    value = json.loads(raw) if raw.strip() else {}
    return value if isinstance(value, dict) else {}


def main() -> int:
    """Print one token per line (flushed, so gpud streams them), log to stderr, exit as asked."""
    meta = read_input()
    print(f"oneoff: pid={os.getpid()} model_path={os.environ.get('MODEL_PATH', '')}", file=sys.stderr, flush=True)
    words = str(meta.get("prompt", "")).split()
    count = int(meta.get("max_tokens", len(words) or 5))
    delay = float(meta.get("delay", 0))
    for i in range(count):
        print(words[i] if i < len(words) else f"token-{i}", flush=True)
        if delay:
            time.sleep(delay)
    if meta.get("sleep"):
        time.sleep(float(meta["sleep"]))
    return int(meta.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
