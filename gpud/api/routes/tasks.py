"""Task routes: submit (answers with the SSE stream), list, show, events (resumable), cancel."""

from __future__ import annotations

from aiohttp import web

from gpud.api import keys
from gpud.api.errors import read_json_object
from gpud.api.sse import last_event_id, stream_task_events
from gpud.work.request import parse_task_request


async def submit(request: web.Request) -> web.StreamResponse:
    """POST /api/tasks/submit: errors found before work starts are JSON; then the task's event stream."""
    settings = request.app[keys.CONFIG].settings
    body = await read_json_object(request)  # strict: what parse_task_request would check again is refused here
    task_request = parse_task_request(
        body, settings.default_task_timeout, settings.max_task_timeout, strict_json_bytes=request.content_length
    )
    task = await request.app[keys.TASKS].submit(task_request)
    return await stream_task_events(
        request,
        task.log,
        heartbeat=settings.sse_heartbeat_seconds,
        after_id=0,
        send_timeout=settings.sse_send_timeout_seconds,
    )


async def list_tasks(request: web.Request) -> web.Response:
    """GET /api/tasks: active and recently finished tasks, oldest first."""
    tasks = request.app[keys.TASKS].registry.all()
    return web.json_response({"tasks": [task.report() for task in tasks]})


async def get_task(request: web.Request) -> web.Response:
    """GET /api/tasks/{task_id}: one task with its output and result."""
    task = request.app[keys.TASKS].registry.get(request.match_info["task_id"])
    return web.json_response(task.report(with_result=True))


async def task_events(request: web.Request) -> web.StreamResponse:
    """GET /api/tasks/{task_id}/events: replay after Last-Event-ID, then live (also after the task ended)."""
    task = request.app[keys.TASKS].registry.get(request.match_info["task_id"])
    after_id = last_event_id(request)
    settings = request.app[keys.CONFIG].settings
    return await stream_task_events(
        request,
        task.log,
        heartbeat=settings.sse_heartbeat_seconds,
        after_id=after_id,
        send_timeout=settings.sse_send_timeout_seconds,
    )


async def cancel_task(request: web.Request) -> web.Response:
    """DELETE /api/tasks/{task_id}: cancel a queued or running task."""
    task = await request.app[keys.TASKS].cancel(request.match_info["task_id"])
    return web.json_response(task.report())


def add_task_routes(app: web.Application) -> None:
    """Task routes (both apps)."""
    app.router.add_post("/api/tasks/submit", submit)
    app.router.add_get("/api/tasks", list_tasks)
    app.router.add_get("/api/tasks/{task_id}", get_task)
    app.router.add_get("/api/tasks/{task_id}/events", task_events)
    app.router.add_delete("/api/tasks/{task_id}", cancel_task)
