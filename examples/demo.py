"""The README demo's client: stream a session task, reuse the session, then run a one-off task.

Usage: python examples/demo.py [URL] (default http://127.0.0.1:8001, API key from $INTERNAL_API_KEY or dev-key).
Prints text deltas as they arrive; other events go to stderr, one line each.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import aiohttp

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8001"
HEADERS = {"X-API-Key": os.environ.get("INTERNAL_API_KEY", "dev-key")}


async def stream(session: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    """Submit a task and print its stream; return a summary (session id, final status)."""
    summary: dict[str, Any] = {}
    async with session.post(f"{URL}/api/tasks/submit", json=body, headers=HEADERS) as response:
        if response.status != 200:
            print(f"error {response.status}: {await response.text()}", file=sys.stderr)
            raise SystemExit(1)
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                summary.setdefault("task_id", data["task_id"])
                if event == "text_delta":
                    print(data["delta"], end="", flush=True)
                elif event == "connection":
                    summary["session_id"] = data.get("session_id")
                    print(f"[connection] {data['status']} on GPU {data['gpu_id']}", file=sys.stderr)
                elif event == "task_finish":
                    summary["status"] = data["status"]
                    print(flush=True)
                    print(f"\n[task_finish] {data['status']} in {data['elapsed_seconds']}s", file=sys.stderr)
                elif event in ("worker", "logs"):
                    shown = {k: v for k, v in data.items() if k not in ("task_id", "container_id")}
                    print(f"[{event}] {shown}", file=sys.stderr)
    return summary


async def main() -> None:
    """Run the three demo tasks."""
    async with aiohttp.ClientSession() as session:
        base = {"model_id": "demo-text", "task_difficulty": "low"}
        print("== session task (starts a worker, loads the model)", file=sys.stderr)
        first = await stream(
            session,
            {
                **base,
                "task_type": "session",
                "task_preset": "stream",
                "metadata": {"prompt": "hello", "max_tokens": 24, "delay": 0.05},
            },
        )
        print("== second task in the same session (model already loaded)", file=sys.stderr)
        await stream(
            session,
            {
                **base,
                "task_type": "session",
                "task_preset": "stream",
                "session_id": first["session_id"],
                "metadata": {"max_tokens": 12, "delay": 0.05},
            },
        )
        async with session.get(f"{URL}/api/sessions/{first['session_id']}", headers=HEADERS) as response:
            info = await response.json()
        print(
            f"== session: {info['tasks_run']} tasks run, model loaded {info['worker'].get('load_count')} time(s)",
            file=sys.stderr,
        )
        print(
            "== one-off task on the high GPU (an ephemeral container; the session holds the low one)", file=sys.stderr
        )
        oneoff = {"model_id": "demo-text", "task_difficulty": "high", "task_type": "oneoff", "task_preset": "oneoff"}
        await stream(session, {**oneoff, "metadata": {"prompt": "one off tasks print line by line"}})
        async with session.delete(f"{URL}/api/sessions/{first['session_id']}", headers=HEADERS) as response:
            print(f"== session killed: {(await response.json())['state']}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
