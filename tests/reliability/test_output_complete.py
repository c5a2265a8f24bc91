"""A one-off that writes 20 MB and exits at once gets all of it to its client, byte for byte, every run, on the
process runtime and through real Podman and Docker (issue 11).

Before: Podman's log follow ended at the exit, and skipped and spliced entries under the burst, so 1-12 MB of
the 20 arrived while the task said `completed`. Now Podman's output is read from its log file, Docker's finished
log is read again after the exit, the process runtime makes the worker wait for a slow follower, and what cannot
be read to its end is marked `output_truncated`.

The test daemon's GPUD_TASK_OUTPUT_MAX_BYTES is raised to 32m: the default 16m stays (it bounds what every task
may hold in memory and in the retention budget; a deployment expecting bigger outputs raises it).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from gpud.settings.presets import load_presets
from tests.figures import Figures
from tests.integration.stack import WORKER_IMAGE, Stack, runtimes, stack_fixture

RUNS = 5
# Lines of many lengths (some far over the runtimes' 64 KiB piece size, of two-byte characters cut across), about
# 20 MB in all, written in 1 MiB writes; the worker exits as soon as the last write returns.
WRITER = """
import sys
def output(long_char):
    parts = []
    for i in range(24800):
        if i % 2000 == 1999:
            parts.append("%08d " % i + long_char * (200000 // len(long_char.encode())) + "L" * 7 + "\\n")
        else:
            parts.append("%08d \\u00fc" % i + chr(97 + i % 26) * (i * 7919 % 1400) + "\\n")
    return "".join(parts).encode()
if __name__ == "__main__":
    data = output(sys.argv[1])
    sys.stderr.write("writing %d bytes\\n" % len(data))
    sys.stderr.flush()
    for start in range(0, len(data), 1 << 20):
        sys.stdout.buffer.write(data[start : start + (1 << 20)])
    sys.stdout.buffer.flush()
"""


def long_char(runtime: str) -> str:
    """What the long lines are made of. Docker's json-file log driver stores a line longer than 16 KiB as 16 KiB
    messages, each a JSON string: a character cut by that split is stored as U+FFFD, before any reader sees it
    (its `local` driver loses the newline after such a line instead), so on Docker they are one-byte characters."""
    return "e" if runtime == "docker" else "\u00e9"


def expected_output(runtime: str) -> bytes:
    """What the writer prints, computed here from the same code."""
    scope: dict[str, object] = {"__name__": "writer"}
    exec(WRITER, scope)
    output = scope["output"]
    assert callable(output)
    data = output(long_char(runtime))
    assert isinstance(data, bytes)
    return data


@pytest.fixture(params=runtimes())
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async for opened in stack_fixture(request.param, {"GPUD_TASK_OUTPUT_MAX_BYTES": "32m"}):
        path = opened.base / "models.yaml"
        command = json.dumps(["python3", "-c", WRITER, long_char(request.param)])
        limits = "{memory: 512m, cpus: 1, pids: 64}"
        with path.open("a") as presets:
            presets.write(
                f"    burst: {{docker_image: '{WORKER_IMAGE}', command: {command}, mode: oneoff, limits: {limits}}}\n"
            )
        opened.services.config.replace(opened.services.settings, load_presets(path))
        yield opened


async def test_a_20_mb_burst_arrives_whole_every_run(stack: Stack, figures: Figures) -> None:
    expected = expected_output(stack.runtime_name)
    digest = hashlib.sha256(expected).hexdigest()
    assert 20_000_000 < len(expected) < 21_000_000
    attack = f"one-off writing {len(expected) / 1e6:.0f} MB ({stack.runtime_name})"
    seconds = []
    for _ in range(RUNS):
        started = time.monotonic()
        events = await stack.run(stack.body("oneoff", preset="burst"))
        seconds.append(time.monotonic() - started)
        finish = events[-1]
        assert finish.event == "task_finish" and finish.data["status"] == "completed", finish.data
        assert "output_truncated" not in finish.data
        streamed = "".join(e.data["delta"] for e in events if e.event == "text_delta").encode()
        (text,) = [e.data["text"].encode() for e in events if e.event == "text"]
        assert len(streamed) == len(expected) and hashlib.sha256(streamed).hexdigest() == digest
        assert hashlib.sha256(text).hexdigest() == digest
        logs = [(e.data["stream"], e.data["line"]) for e in events if e.event == "logs"]
        assert logs == [("stderr", f"writing {len(expected)} bytes")], "no gpud notice: nothing was cut or truncated"
    figures.record(attack, "runs, all byte-exact", RUNS)
    figures.record(attack, "slowest run (submit to task_finish)", max(seconds), "s")
    figures.record(attack, "fastest run", min(seconds), "s")
    assert stack.services.scheduler.leases() == []
    await stack.all_removed()
