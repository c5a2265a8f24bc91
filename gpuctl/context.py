"""What every gpuctl command shares: the socket, the client, output styles, `-o`, and error-to-exit-code mapping."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar

import click

from gpuctl.client import ApiError, Client, ClientError, SocketChoice, StreamLost, Unreachable, UntrustedSocket
from gpuctl.ids import AmbiguousId
from gpuctl.output import Style, colour_enabled, dump_json

F = TypeVar("F", bound=Callable[..., Any])
Renderer = Callable[[Any, Style], str]


class ExitCode(IntEnum):
    """gpuctl's documented exit codes (docs/gpuctl.md)."""

    OK = 0
    API_ERROR = 1  # the daemon answered with an error
    USAGE = 2  # click's own code for bad arguments
    UNREACHABLE = 3  # no daemon at the socket, no permission, or the connection broke
    TASK_FAILED = 4  # the task ended failed, timeout or cancelled


@dataclass
class App:
    """Per-invocation state handed to every command through click's context."""

    socket: SocketChoice
    fmt: str | None = None  # `gpuctl -o FORMAT ...`: the output format when a command is not given its own

    def client(self) -> Client:
        """A client for the chosen socket."""
        return Client(self.socket.path)

    @property
    def out_style(self) -> Style:
        """Colours for stdout."""
        return Style(colour_enabled(sys.stdout))

    @property
    def err_style(self) -> Style:
        """Colours for stderr."""
        return Style(colour_enabled(sys.stderr))


pass_app = click.make_pass_decorator(App)


FORMATS = ("table", "json")
FORMAT_HELP = "table for people, json (stable, see docs/gpuctl.md) for scripts"


def _format(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """The command's own -o, else the one given before the subcommand (`gpuctl -o json sessions ls`), else table."""
    if value is not None:
        return value
    app = ctx.find_object(App)
    return app.fmt if app is not None and app.fmt else "table"


def output_option(func: F) -> F:
    """`-o table|json` on a command (it may also come before the subcommand)."""
    option = click.option(
        "-o",
        "--output",
        "fmt",
        type=click.Choice(FORMATS),
        default=None,
        callback=_format,
        help=f"{FORMAT_HELP} [default: table, or gpuctl's own -o]",
    )
    return option(func)


def show(app: App, fmt: str, value: Any, view: str | Renderer, key: str | None = None, **options: Any) -> None:
    """Print the daemon's object as JSON, or for people with `view` (a gpuctl.render function name, or a callable).

    gpuctl.render is imported only here, for table output: scripts using -o json never pay for it.
    """
    if fmt == "json":
        dump_json(value)
        return
    click.echo(render(app, view, value, key, **options))


def render(app: App, view: str | Renderer, value: Any, key: str | None = None, **options: Any) -> str:
    """The daemon's object for people, drawn by `view` (a gpuctl.render function name, or a callable)."""
    if isinstance(view, str):
        from gpuctl import render as views

        view = functools.partial(getattr(views, view), **options)
    return view(value[key] if key else value, app.out_style)


def warn(app: App, message: str) -> None:
    """A `gpuctl: ...` line on stderr (red on a terminal)."""
    click.echo(app.err_style.paint(f"gpuctl: {message}", "red"), err=True)


def exit_code_for(app: App, exc: ClientError) -> ExitCode:
    """Report a client error on stderr the way operators can act on it; return the exit code."""
    where = f"{app.socket.path} (from {app.socket.source})"
    if isinstance(exc, Unreachable) and exc.permission:
        warn(app, f"permission denied on the admin socket {where}: add your user to group gpud")
        click.echo('  e.g. sudo usermod -aG gpud "$USER", then log in again', err=True)
        return ExitCode.UNREACHABLE
    if isinstance(exc, UntrustedSocket):
        warn(app, f"refusing to use the admin socket {where}: {exc.reason}")
        click.echo("  another user could have put a fake gpud there; the socket and the directories above it", err=True)
        click.echo("  must be owned by root or you, and its directory writable by no one else", err=True)
        return ExitCode.UNREACHABLE
    if isinstance(exc, Unreachable):
        warn(app, f"cannot reach gpud at {where}: {exc.reason}")
        click.echo("  is gpud running? try: systemctl status gpud", err=True)
        return ExitCode.UNREACHABLE
    if isinstance(exc, StreamLost):
        warn(app, str(exc))
        return ExitCode.UNREACHABLE
    if isinstance(exc, AmbiguousId):
        warn(app, f"{exc}; give more of it:")
        for line in exc.lines():
            click.echo(line, err=True)
        return ExitCode.USAGE
    if isinstance(exc, ApiError):
        warn(app, f"{exc.code}: {exc.message} (HTTP {exc.status})")
        if exc.code == "peer_not_allowed":
            click.echo("  add your user to group gpud (the admin socket's group)", err=True)
        return ExitCode.API_ERROR
    warn(app, str(exc))
    return ExitCode.API_ERROR


class GpuctlGroup(click.Group):
    """The root group: turns client errors raised by any subcommand into a message and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; ClientError becomes exit 1 or 3 with a helpful line on stderr."""
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            app = ctx.find_object(App) or App(SocketChoice("?", "?"))
            raise click.exceptions.Exit(exit_code_for(app, exc)) from None


def describe(exc: ClientError) -> str:
    """A client error as one line, for a --watch frame (which keeps going)."""
    if isinstance(exc, Unreachable):
        return f"gpuctl: cannot reach gpud at {exc.path}: {exc.reason} (still watching)"
    if isinstance(exc, ApiError):
        return f"gpuctl: {exc.code}: {exc.message} (HTTP {exc.status})"
    return f"gpuctl: {exc}"


def environ() -> Mapping[str, str]:
    """The process environment (a function so tests can see where it is read)."""
    return os.environ
