"""Admin route: what a session's worker wrote (gpud/work/sessions/output.py), streamed as lines (plain text, or
NDJSON with the stream name)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from gpud.api import keys
from gpud.errors import Conflict, Gone, InvalidRequest
from gpud.work.sessions.output import OutputLine, WorkerOutput

logger = logging.getLogger(__name__)

# How often a quiet follow stream checks whether its client has gone (aiohttp does not cancel handlers).
_DISCONNECT_POLL = 1.0
_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"", "0", "false", "no"})


@dataclass(frozen=True)
class LogOptions:
    """What the client asked for: keep following, only the last N lines, and the line format."""

    follow: bool
    tail: int | None
    ndjson: bool


def parse_options(query: dict[str, str]) -> LogOptions:
    """follow=0|1, tail=N (N >= 0), format=text|ndjson; anything else is a 400 naming the parameter."""
    follow = query.get("follow", "").lower()
    if follow not in _TRUE | _FALSE:
        raise InvalidRequest(f"follow must be 0 or 1, got {follow!r}", code="invalid_follow")
    raw_tail = query.get("tail", "")
    if raw_tail and not raw_tail.isdigit():
        raise InvalidRequest(f"tail must be a whole number >= 0, got {raw_tail!r}", code="invalid_tail")
    fmt = query.get("format", "text")
    if fmt not in ("text", "ndjson"):
        raise InvalidRequest(f"format must be text or ndjson, got {fmt!r}", code="invalid_format")
    return LogOptions(follow=follow in _TRUE, tail=int(raw_tail) if raw_tail else None, ndjson=fmt == "ndjson")


def encode(lines: Iterable[OutputLine], ndjson: bool) -> bytes:
    """Lines as one chunk: the bare line, or {"stream", "line"} per line, plus "task_id" on a worker's protocol
    `log` line and "partial": true on each piece of an over-long line but its last (in text, such pieces are
    written without a newline, so the line stays whole)."""
    if ndjson:
        return b"".join(json.dumps(_entry(ln)).encode() + b"\n" for ln in lines)
    return b"".join(ln.line.encode("utf-8", errors="replace") + (b"" if ln.partial else b"\n") for ln in lines)


def _entry(line: OutputLine) -> dict[str, object]:
    entry: dict[str, object] = {"stream": line.stream, "line": line.line}
    if line.task_id is not None:
        entry["task_id"] = line.task_id
    if line.partial:
        entry["partial"] = True
    return entry


def _gap(count: int) -> OutputLine:
    """A line from gpud standing for `count` lines no longer kept."""
    return OutputLine(-1, "gpud", f"[gpud: {count} earlier line(s) of this worker are no longer kept]")


async def session_logs(request: web.Request) -> web.StreamResponse:
    """GET /api/sessions/{session_id}/logs?follow=1&tail=N&format=ndjson: what the worker wrote (its container
    output and its protocol `log` lines, in the order gpud received them), then (follow) more."""
    options = parse_options(dict(request.query))
    sessions = request.app[keys.SESSIONS]
    session = sessions.registry.get(request.match_info["session_id"])
    output = sessions.output(session)
    if output is None:
        if session.is_over:
            reason = session.end_reason or session.state.value
            raise Gone(f"session {session.id}: its worker is gone ({reason})", code="session_logs_gone")
        raise Conflict(
            f"session {session.id} has no worker container yet ({session.state.value})", code="session_no_container"
        )
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.content_type = "application/x-ndjson" if options.ndjson else "text/plain"
    response.charset = "utf-8"
    await response.prepare(request)
    try:
        backlog = output.since(0) if options.tail is None else output.last(options.tail)
        if output.first_seq > 0 and (options.tail is None or options.tail > len(backlog)):
            backlog.insert(0, _gap(output.first_seq))  # asked for more than is kept: say so
        if backlog:
            await response.write(encode(backlog, options.ndjson))
        if options.follow:
            await _follow(request, response, output, output.next_seq, options.ndjson)
        await response.write_eof()
    except ConnectionError:
        logger.debug("log client went away")
    return response


async def _follow(
    request: web.Request, response: web.StreamResponse, output: WorkerOutput, seq: int, ndjson: bool
) -> None:
    """Write lines from position `seq` on until the worker is gone or the client leaves."""
    while True:
        lines = output.since(seq)
        if lines:
            if lines[0].seq > seq:  # this reader fell behind the ring's limits
                lines.insert(0, _gap(lines[0].seq - seq))
            seq = lines[-1].seq + 1
            await response.write(encode(lines, ndjson))
            continue
        if output.closed:
            return
        await output.wait(seq, _DISCONNECT_POLL)
        transport = request.transport
        if transport is None or transport.is_closing():
            return


def add_log_routes(app: web.Application) -> None:
    """Register the session-logs route (admin app only: worker output may carry secrets)."""
    app.router.add_get("/api/sessions/{session_id}/logs", session_logs)
