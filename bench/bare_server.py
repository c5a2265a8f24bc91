"""The baseline server: bare aiohttp in its own process (as gpud is), on 127.0.0.1, printing `URL <base>` first.

POST /echo    reads the JSON body, answers a small JSON object (a bare JSON round trip).
POST /sse     reads the JSON body ({"deltas": N}), then streams N `text_delta` frames, one write() each (what a plain
              aiohttp SSE handler does), and a `task_finish` frame; frames shaped as gpud's.
GET /fan      ?group=G&deltas=N&interval=S&start_at=T: subscribe to group G's stream (bench_fanin's baseline). The
              first subscriber starts the group's producer, which from epoch time T puts `time.time()` in a delta
              every S seconds, N times, then task_finish, into every subscriber's queue; each subscriber's handler
              writes what its queue holds (a plain fan-out: no worker process, no event log, no replay).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping

from aiohttp import web


def frame(event_id: int, event: str, data: Mapping[str, object]) -> bytes:
    """One SSE frame as gpud writes it."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, event.encode(), json.dumps(data).encode())


async def echo(request: web.Request) -> web.Response:
    """A bare JSON round trip."""
    await request.json()
    return web.json_response({"status": "completed"})


async def sse(request: web.Request) -> web.StreamResponse:
    """A bare SSE stream of N deltas."""
    body = await request.json()
    count = int(body.get("deltas", 1))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i in range(count):
        await response.write(frame(i + 1, "text_delta", {"task_id": "bare", "delta": "x"}))
    await response.write(frame(count + 1, "task_finish", {"task_id": "bare", "status": "completed"}))
    await response.write_eof()
    return response


class Group:
    """One fan-out stream: its subscribers' queues and its producer."""

    def __init__(self, deltas: int, interval: float, start_at: float) -> None:
        self.queues: list[asyncio.Queue[bytes | None]] = []
        self.producer = asyncio.create_task(self.produce(deltas, interval, start_at))

    async def produce(self, deltas: int, interval: float, start_at: float) -> None:
        """Stamp and hand out the deltas, then the end."""
        await asyncio.sleep(max(0.0, start_at - time.time()))
        for i in range(deltas):
            data = {"delta": f"{time.time():.6f}\n", "task_id": "bare"}
            self.send(frame(i + 1, "text_delta", data))
            await asyncio.sleep(interval)
        self.send(frame(deltas + 1, "task_finish", {"task_id": "bare", "status": "completed"}))
        for queue in self.queues:
            queue.put_nowait(None)

    def send(self, data: bytes) -> None:
        """Into every subscriber's queue."""
        for queue in self.queues:
            queue.put_nowait(data)


GROUPS = web.AppKey("groups", dict)


async def fan(request: web.Request) -> web.StreamResponse:
    """Subscribe to a fan-out group (started by its first subscriber)."""
    query = request.query
    groups = request.app[GROUPS]
    group = groups.get(query["group"])
    if group is None:
        group = groups[query["group"]] = Group(int(query["deltas"]), float(query["interval"]), float(query["start_at"]))
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    group.queues.append(queue)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(b": subscribed\n\n")
    while (data := await queue.get()) is not None:
        await response.write(data)
    await response.write_eof()
    return response


async def main() -> None:
    """Serve until killed."""
    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_post("/sse", sse)
    app.router.add_get("/fan", fan)
    app[GROUPS] = {}
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"URL http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
