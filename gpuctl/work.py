"""gpuctl commands about work: sessions, tasks, submit (live streaming), and a session worker's logs."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import click

from gpuctl.client import SseEvent
from gpuctl.context import App, ExitCode, describe, output_option, pass_app, render, show, warn
from gpuctl.ids import SESSION, TASK, completer, started, with_id
from gpuctl.output import json_line
from gpuctl.unixhttp import quote_segment
from gpuctl.watch import repeat, watch_options

# Task statuses that end gpuctl with exit code 4.
FAILED_STATUSES = frozenset({"failed", "timeout", "cancelled"})
# What `--state` / `--status` accept: the daemon's words, and one word for all those not ended.
SESSION_STATES = {"live": ("starting", "ready", "working", "stopping"), "stopped": (), "failed": ()}
TASK_STATUSES = {"active": ("queued", "running"), "completed": (), **{s: () for s in FAILED_STATUSES}}


def _q(value: str) -> str:
    return quote_segment(value)


# ---- sessions ---------------------------------------------------------------------------------------------------


@click.group()
def sessions() -> None:
    """Session workers: list, show, kill, keepalive."""


def _choices(words: Mapping[str, tuple[str, ...]], *daemon_words: str) -> click.Choice:
    return click.Choice(sorted({*words, *daemon_words}))


def _wanted(values: tuple[str, ...], words: Mapping[str, tuple[str, ...]]) -> set[str]:
    """The daemon's words for what was asked (`live` / `active` stand for several)."""
    return {word for value in values for word in (words.get(value) or (value,))}


def filtered(body: Mapping[str, Any], key: str, field: str, states: set[str], models: tuple[str, ...]) -> Any:
    """The list under `key` keeping only items in one of `states` (if any) and of one of `models` (if any)."""
    items = [
        item
        for item in body.get(key) or []
        if (not states or item.get(field) in states) and (not models or item.get("model_id") in models)
    ]
    return {**body, key: items}


def _list(app: App, fmt: str, watch: float | None, count: int | None, title: str, fetch: Any, key: str) -> None:
    """Show a list once, or redraw it with --watch."""
    if watch is None:
        show(app, fmt, fetch(), key, key)
        return
    repeat(title, watch, count, fmt, fetch, functools.partial(render, app, key, key=key), describe)


SESSION_ID = click.argument("session_id", shell_complete=completer(SESSION))
TASK_ID = click.argument("task_id", shell_complete=completer(TASK))
MODEL_FILTER = click.option("--model", "models", multiple=True, metavar="MODEL", help="only this model (repeatable)")


@sessions.command("ls")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=_choices(SESSION_STATES, "starting", "ready", "working", "stopping"),
    help="only sessions in this state (repeatable; live = not ended)",
)
@MODEL_FILTER
@output_option
@watch_options
@pass_app
def sessions_ls(
    app: App, states: tuple[str, ...], models: tuple[str, ...], fmt: str, watch: float | None, count: int | None
) -> None:
    """Live sessions and recently ended ones."""
    wanted = _wanted(states, SESSION_STATES)

    def fetch() -> Any:
        return filtered(app.client().get("/api/sessions"), "sessions", "state", wanted, models)

    _list(app, fmt, watch, count, "gpuctl sessions ls", fetch, "sessions")


@sessions.command("show")
@SESSION_ID
@output_option
@pass_app
def sessions_show(app: App, session_id: str, fmt: str) -> None:
    """One session in full (SESSION_ID may be a unique prefix, as everywhere)."""
    client = app.client()
    show(app, fmt, with_id(client, SESSION, session_id, lambda sid: client.get(f"/api/sessions/{_q(sid)}")), "session")


@sessions.command("kill")
@SESSION_ID
@output_option
@pass_app
def sessions_kill(app: App, session_id: str, fmt: str) -> None:
    """End a session: its running and queued tasks finish as cancelled, its worker is removed."""
    client = app.client()
    body = with_id(client, SESSION, session_id, lambda sid: client.delete(f"/api/sessions/{_q(sid)}"))
    show(app, fmt, body, "session")


@sessions.command("keepalive")
@SESSION_ID
@output_option
@pass_app
def sessions_keepalive(app: App, session_id: str, fmt: str) -> None:
    """Reset a session's idle timer."""
    client = app.client()
    body = with_id(client, SESSION, session_id, lambda sid: client.post(f"/api/sessions/{_q(sid)}/keepalive"))
    show(app, fmt, body, "session")


# ---- tasks ------------------------------------------------------------------------------------------------------


@click.group()
def tasks() -> None:
    """Tasks: list, show, cancel, follow events."""


@tasks.command("ls")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=_choices(TASK_STATUSES, "queued", "running"),
    help="only tasks with this status (repeatable; active = queued or running)",
)
@MODEL_FILTER
@output_option
@pass_app
def tasks_ls(app: App, statuses: tuple[str, ...], models: tuple[str, ...], fmt: str) -> None:
    """Active and recently finished tasks."""
    body = app.client().get("/api/tasks")
    show(app, fmt, filtered(body, "tasks", "status", _wanted(statuses, TASK_STATUSES), models), "tasks", "tasks")


@tasks.command("show")
@TASK_ID
@output_option
@pass_app
def tasks_show(app: App, task_id: str, fmt: str) -> None:
    """One task with its output and result (TASK_ID may be a unique prefix, as everywhere)."""
    client = app.client()
    show(app, fmt, with_id(client, TASK, task_id, lambda tid: client.get(f"/api/tasks/{_q(tid)}")), "task")


@tasks.command("cancel")
@TASK_ID
@output_option
@pass_app
def tasks_cancel(app: App, task_id: str, fmt: str) -> None:
    """Cancel a queued or running task."""
    client = app.client()
    show(app, fmt, with_id(client, TASK, task_id, lambda tid: client.delete(f"/api/tasks/{_q(tid)}")), "task")


@tasks.command("events")
@TASK_ID
@click.option("--after", "after_id", type=click.IntRange(min=0), default=0, help="start after this event id")
@click.option("--text", "text_only", is_flag=True, help="print only the task's text, as `submit` does")
@output_option
@pass_app
def tasks_events(app: App, task_id: str, after_id: int, text_only: bool, fmt: str) -> None:
    """Follow a task's events (replayed, then live) until it finishes; resumes if the stream breaks."""
    printer = StreamPrinter(app, fmt=fmt, verbose=not text_only, text=text_only, events_to_stdout=not text_only)
    client = app.client()
    printer.consume(with_id(client, TASK, task_id, lambda tid: started(client.events(tid, after_id))))
    raise click.exceptions.Exit(printer.exit_code())


# ---- submit -----------------------------------------------------------------------------------------------------


def parse_meta(pairs: Iterable[str]) -> dict[str, Any]:
    """key=value pairs; a value that is valid JSON (30, true, [1,2], "x") is taken as JSON, else as a string."""
    metadata: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--meta")
        try:
            metadata[key] = json.loads(raw)
        except ValueError:
            metadata[key] = raw
    return metadata


def load_metadata_file(path: str | None) -> dict[str, Any]:
    """A JSON object from a file ('-' for stdin)."""
    if path is None:
        return {}
    try:
        with click.open_file(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--metadata-file") from None
    if not isinstance(value, dict):
        raise click.BadParameter(f"{path} must hold a JSON object", param_hint="--metadata-file")
    return value


@click.command()
@click.argument("model_id")
@click.argument("preset")
@click.option(
    "--session", "session_id", metavar="ID", shell_complete=completer(SESSION), help="run on this session (its queue)"
)
@click.option("--oneoff", is_flag=True, help="a one-off task in an ephemeral container (default: a session task)")
@click.option("--difficulty", type=click.Choice(["low", "high"]), default="low", show_default=True)
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="metadata field (repeatable; JSON values)")
@click.option(
    "--metadata-file", type=click.Path(dir_okay=False, allow_dash=True), help="metadata JSON object ('-': stdin)"
)
@click.option("--timeout", "timeout_seconds", type=click.FloatRange(min=0, min_open=True), help="task timeout (s)")
@click.option("-v", "--verbose", is_flag=True, help="also print the other events (connection, worker, logs) to stderr")
@output_option
@pass_app
def submit(
    app: App,
    model_id: str,
    preset: str,
    session_id: str | None,
    oneoff: bool,
    difficulty: str,
    meta: tuple[str, ...],
    metadata_file: str | None,
    timeout_seconds: float | None,
    verbose: bool,
    fmt: str,
) -> None:
    """Run a task on MODEL_ID with PRESET: its text streams to stdout; the exit code follows its status."""
    if oneoff and session_id:
        raise click.UsageError("--oneoff and --session exclude each other")
    body: dict[str, Any] = {
        "task_type": "oneoff" if oneoff else "session",
        "task_difficulty": difficulty,
        "model_id": model_id,
        "task_preset": preset,
        "metadata": {**load_metadata_file(metadata_file), **parse_meta(meta)},
    }
    if timeout_seconds is not None:
        body["timeout_seconds"] = timeout_seconds
    printer = StreamPrinter(app, fmt=fmt, verbose=verbose, text=True, events_to_stdout=False)
    client = app.client()
    try:
        if session_id:
            events = with_id(
                client, SESSION, session_id, lambda sid: started(client.submit({**body, "session_id": sid}))
            )
        else:
            events = client.submit(body)
        printer.consume(events)
    except KeyboardInterrupt:
        printer.detached()
        raise click.exceptions.Exit(130) from None
    raise click.exceptions.Exit(printer.exit_code())


@dataclass
class StreamPrinter:
    """Prints a task's events as they arrive: text to stdout, others to stderr (or all as JSON lines)."""

    app: App
    fmt: str
    verbose: bool
    text: bool
    events_to_stdout: bool
    task_id: str | None = None
    finish: Mapping[str, Any] | None = None
    _printed_text: bool = False
    _ends_with_newline: bool = True

    def consume(self, events: Iterable[SseEvent]) -> None:
        """Print every event until task_finish."""
        for event in events:
            if self.task_id is None and event.data.get("task_id"):
                self.task_id = str(event.data["task_id"])
                if self.verbose and self.fmt != "json":
                    click.echo(f"task {self.task_id}", err=not self.events_to_stdout)
            if event.event == "task_finish":
                self.finish = event.data
            if self.fmt == "json":
                json_line(event.to_dict())
            else:
                self._human(event)
        if self.fmt != "json" and self._printed_text and not self._ends_with_newline:
            self._write("\n")
        if self.fmt != "json" and self.finish is not None:
            self._report_finish()

    def _human(self, event: SseEvent) -> None:
        if self.text and event.event == "text_delta":
            self._write(str(event.data.get("delta", "")))
        elif self.text and event.event == "text" and not self._printed_text:
            self._write(str(event.data.get("text", "")))  # a worker that sent no deltas: its whole text
        elif self.verbose:
            from gpuctl.render import event as render_event  # only people's output needs it

            line = render_event(event.event, event.data, event.id)
            click.echo(line, err=not self.events_to_stdout)

    def _write(self, chunk: str) -> None:
        if not chunk:
            return
        # Flushed per delta: a pipe would otherwise hold tokens until exit, defeating live streaming.
        sys.stdout.write(chunk)
        sys.stdout.flush()
        self._printed_text = True
        self._ends_with_newline = chunk.endswith("\n")

    def _report_finish(self) -> None:
        assert self.finish is not None
        status = str(self.finish.get("status"))
        if status not in FAILED_STATUSES:
            return
        error = self.finish.get("error") or {}
        detail = f": {error.get('code')}: {error.get('message')}" if error else ""
        if self.finish.get("exit_code") is not None:
            detail += f" (exit code {self.finish['exit_code']})"
        warn(self.app, f"task {self.task_id} {status}{detail}")

    def exit_code(self) -> int:
        """0 for completed, 4 for failed/timeout/cancelled."""
        status = (self.finish or {}).get("status")
        return int(ExitCode.TASK_FAILED if status in FAILED_STATUSES else ExitCode.OK)

    def detached(self) -> None:
        """Ctrl-C: the task goes on (until gpud's client-gone grace ends); say how to get back to it."""
        if self.task_id:
            warn(self.app, f"detached from task {self.task_id}; it is cancelled if no client returns in time")
            click.echo(f"  gpuctl tasks events {self.task_id}   |   gpuctl tasks cancel {self.task_id}", err=True)


# ---- logs -------------------------------------------------------------------------------------------------------


@click.command()
@SESSION_ID
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines until the worker ends")
@click.option("--tail", type=click.IntRange(min=0), help="only the last N lines so far")
@output_option
@pass_app
def logs(app: App, session_id: str, follow: bool, tail: int | None, fmt: str) -> None:
    """What a session's worker wrote: its output and its `log` lines (ctx.log), in the order gpud got them;
    stdout to stdout, every other stream to stderr (json: one object per line)."""
    client = app.client()
    try:
        lines = with_id(
            client, SESSION, session_id, lambda sid: started(client.log_lines(sid, follow=follow, tail=tail))
        )
        for entry in lines:
            if fmt == "json":
                json_line(entry)
            else:
                click.echo(entry.get("line", ""), err=entry.get("stream") != "stdout", nl=not entry.get("partial"))
    except KeyboardInterrupt:
        raise click.exceptions.Exit(ExitCode.OK) from None
