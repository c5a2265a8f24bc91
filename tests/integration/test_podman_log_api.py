"""Podman's output through libpod's log API, which gpud uses where it cannot read a container's log file (gpud/runtime/
crilog.py is the usual way): after the follow ends, the finished log is read again and only the bytes not yet read
are passed on, per stream."""

from __future__ import annotations

from pathlib import Path

from gpud.runtime.base import Stream
from gpud.runtime.podman import PodmanRuntime
from tests.integration.conftest import SpecMaker, engine_socket, remove_test_containers


async def test_podmans_log_api_still_serves_when_the_log_file_cannot_be_read(run_id: str, model_dir: Path) -> None:
    """The fallback (another log driver, a remote engine): libpod's log API, read again after the exit, skipping
    per stream the bytes already read. Not byte-exact under a burst (libpod's follow splices entries), but whole
    for ordinary output, long lines and an unterminated last line included."""
    runtime = PodmanRuntime(engine_socket("podman"), log_files=False)
    spec = SpecMaker(run_id, model_dir)
    script = (
        "import sys, time\n"
        "for i in range(200):\n"
        "    print('line', i, flush=True)\n"
        "sys.stderr.write('e' * 100000 + '\\n'); sys.stderr.flush()\n"
        "sys.stdout.write('no newline at the end'); sys.stdout.flush()\n"
    )
    try:
        container_id = await runtime.run(spec("python3", "-c", script))
        lines = [line async for line in runtime.logs(container_id)]
        out = "".join(line.line + ("" if line.partial else "\n") for line in lines if line.stream is Stream.STDOUT)
        err = "".join(line.line + ("" if line.partial else "\n") for line in lines if line.stream is Stream.STDERR)
        assert out == "".join(f"line {i}\n" for i in range(200)) + "no newline at the end\n"
        assert err == "e" * 100000 + "\n"
    finally:
        await remove_test_containers(runtime, run_id)
        await runtime.close()
