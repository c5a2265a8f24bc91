"""The SDK runs a session's tasks in one thread for its life (a new thread per task cost each a start-up), one
task at a time."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

from gpud.worker import sdk_source_path
from gpud.worker.channel import WorkerChannel
from gpud.worker.protocol import ENV_SOCKET

WORKER = """
import threading, time
import gpud_worker

class Worker:
    def predict(self, input, ctx):
        if input.get("hang"):
            time.sleep(float(input["hang"]))  # ignores the cancel flag
        return f"{threading.get_ident()} {threading.active_count()}"

gpud_worker.serve(Worker)
"""


async def test_tasks_share_one_thread_one_at_a_time(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(sdk_source_path(), lib / "gpud_worker.py")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    channel = WorkerChannel(tmp_path / "sock", uid=os.geteuid(), gid=os.getegid())
    await channel.start()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(lib), ENV_SOCKET: str(channel.socket_path)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-S", str(script), env=env)
    try:
        await channel.wait_ready(10)
        seen = set()
        for n in range(20):
            events = [e async for e in channel.run_task(f"t{n}", {})]
            assert events[-1].data["status"] == "completed"
            seen.add(next(e.data["text"] for e in events if e.type == "text"))
        assert len(seen) == 1, seen  # the same thread each time, and no thread more
        slow = [e async for e in channel.run_task("slow", {"hang": 0.3})]
        assert slow[-1].data["status"] == "completed"
        assert {e.data.get("text") for e in slow if e.type == "text"} == seen
    finally:
        await channel.close()
        proc.kill()
        await proc.wait()
