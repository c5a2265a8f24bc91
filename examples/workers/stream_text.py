"""Example session worker: loads $MODEL_PATH/tokens.txt once, then streams tokens per task.

Task input (the task's metadata): prompt (echoed in the result), max_tokens (default 16), delay (seconds per
token, default 0.05). Test switches: crash=true exits the process with code 3 mid-task, fail=true reports a task
error without crashing, ignore_cancel=true keeps working through a cancel (a stuck worker).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gpud_worker


class StreamText:
    """Streams words from the model file; counts how often this process loaded it."""

    # Process-wide on purpose: it proves a session reuses one loaded model across tasks.
    load_count = 0

    def setup(self) -> dict[str, Any]:
        """Load the token file once; fail clearly when the model is missing."""
        model_path = os.environ.get("MODEL_PATH")
        if not model_path:
            raise RuntimeError("MODEL_PATH is not set; gpud mounts the model there")
        path = Path(model_path) / "tokens.txt"
        if not path.is_file():
            raise RuntimeError(f"model file {path} not found")
        self.tokens = path.read_text(encoding="utf-8").split()
        if not self.tokens:
            raise RuntimeError(f"model file {path} holds no tokens")
        StreamText.load_count += 1
        return {"load_count": StreamText.load_count, "tokens": len(self.tokens)}

    def predict(self, input: dict[str, Any], ctx: gpud_worker.Context) -> Iterator[str]:
        """Yield max_tokens tokens, one every `delay` seconds, stopping promptly on cancel."""
        max_tokens = int(input.get("max_tokens", 16))
        delay = float(input.get("delay", 0.05))
        ctx.log(f"prompt={input.get('prompt', '')!r} max_tokens={max_tokens}")
        if input.get("ignore_cancel"):
            # Simulates a worker stuck in native code: it sleeps through any cancel before yielding.
            time.sleep(delay * max_tokens)
        for i in range(max_tokens):
            if i == max_tokens // 2:
                if input.get("crash"):
                    sys.stdout.flush()
                    os._exit(3)
                if input.get("fail"):
                    raise RuntimeError("failure requested by metadata.fail")
            yield self.tokens[i % len(self.tokens)] + (" " if i + 1 < max_tokens else "")
            ctx.progress(i + 1, max_tokens)
            if not input.get("ignore_cancel") and ctx.wait(delay):
                return
        ctx.result(load_count=StreamText.load_count, prompt=input.get("prompt", ""), tokens=max_tokens)


if __name__ == "__main__":
    gpud_worker.serve(StreamText)
