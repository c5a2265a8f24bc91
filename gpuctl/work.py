"""gpuctl commands about work: sessions, tasks, submit (live streaming), and a session worker's logs."""

from __future__ import annotations

import json
import sys
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import click

from gpuctl.client import SseEvent
from gpuctl.context import App, ExitCode, output_option, pass_app, show, warn
from gpuctl.output import json_line

# Task statuses that end gpuctl with exit code 4.
FAILED_STATUSES = frozenset({"failed", "timeout", "cancelled"})


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


# ---- sessions ---------------------------------------------------------------------------------------------------


@click.group()
def sessions() -> None:
    """Session workers: list, show, kill, keepalive."""


@sessions.command("ls")
@output_option
@pass_app
def sessions_ls(app: App, fmt: str) -> None:
    """Live sessions and recently ended ones."""
    body = app.client().get("/api/sessions")
    show(app, fmt, body, "sessions", "sessions")


@sessions.command("show")
@click.argument("session_id")
@output_option
@pass_app
def sessions_show(app: App, session_id: str, fmt: str) -> None:
    """One session in full."""
    show(app, fmt, app.client().get(f"/api/sessions/{_q(session_id)}"), "session")


@sessions.command("kill")
@click.argument("session_id")
@output_option
@pass_app
def sessions_kill(app: App, session_id: str, fmt: str) -> None:
    """End a session: its running and queued tasks finish as cancelled, its worker is removed."""
    show(app, fmt, app.client().delete(f"/api/sessions/{_q(session_id)}"), "session")


@sessions.command("keepalive")
@click.argument("session_id")
@output_option
@pass_app
def sessions_keepalive(app: App, session_id: str, fmt: str) -> None:
    """Reset a session's idle timer."""
    show(app, fmt, app.client().post(f"/api/sessions/{_q(session_id)}/keepalive"), "session")


# ---- tasks ------------------------------------------------------------------------------------------------------


@click.group()
def tasks() -> None:
    """Tasks: list, show, cancel, follow events."""


@tasks.command("ls")
@output_option
@pass_app
def tasks_ls(app: App, fmt: str) -> None:
    """Active and recently finished tasks."""
    body = app.client().get("/api/tasks")
    show(app, fmt, body, "tasks", "tasks")


@tasks.command("show")
@click.argument("task_id")
@output_option
@pass_app
def tasks_show(app: App, task_id: str, fmt: str) -> None:
    """One task with its output and result."""
    show(app, fmt, app.client().get(f"/api/tasks/{_q(task_id)}"), "task")


@tasks.command("cancel")
@click.argument("task_id")
@output_option
@pass_app
def tasks_cancel(app: App, task_id: str, fmt: str) -> None:
    """Cancel a queued or running task."""
    show(app, fmt, app.client().delete(f"/api/tasks/{_q(task_id)}"), "task")


@tasks.command("events")
@click.argument("task_id")
@click.option("--after", "after_id", type=click.IntRange(min=0), default=0, help="start after this event id")
@click.option("--text", "text_only", is_flag=True, help="print only the task's text, as `submit` does")
@output_option
@pass_app
def tasks_events(app: App, task_id: str, after_id: int, text_only: bool, fmt: str) -> None:
    """Follow a task's events (replayed, then live) until it finishes; resumes if the stream breaks."""
    printer = StreamPrinter(app, fmt=fmt, verbose=not text_only, text=text_only, events_to_stdout=not text_only)
    printer.consume(app.client().events(task_id, after_id))
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
@click.option("--session", "session_id", metavar="ID", help="run on this existing session (its queue)")
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
    if session_id:
        body["session_id"] = session_id
    if timeout_seconds is not None:
        body["timeout_seconds"] = timeout_seconds
    printer = StreamPrinter(app, fmt=fmt, verbose=verbose, text=True, events_to_stdout=False)
    try:
        printer.consume(app.client().submit(body))
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
@click.argument("session_id")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines until the worker ends")
@click.option("--tail", type=click.IntRange(min=0), help="only the last N lines so far")
@output_option
@pass_app
def logs(app: App, session_id: str, follow: bool, tail: int | None, fmt: str) -> None:
    """A session worker's output: its stdout to stdout, its stderr to stderr (json: one object per line)."""
    try:
        for entry in app.client().log_lines(session_id, follow=follow, tail=tail):
            if fmt == "json":
                json_line(entry)
            else:
                click.echo(entry.get("line", ""), err=entry.get("stream") == "stderr")
    except KeyboardInterrupt:
        raise click.exceptions.Exit(ExitCode.OK) from None
