"""`--watch`: redraw a command's output every few seconds until Ctrl-C (or `--count` redraws), like watch(1)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from gpuctl.client import ClientError
from gpuctl.output import json_line

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_INTERVAL = 2.0
# Cursor home, then clear the screen: each frame replaces the last on a terminal.
_CLEAR = "\x1b[H\x1b[2J"


def watch_options(func: F) -> F:
    """`-w/--watch [SECONDS]` and `--count N` on a command."""
    func = click.option(
        "--count",
        type=click.IntRange(min=1),
        default=None,
        help="with --watch: stop after N redraws",
    )(func)
    option = click.option(
        "-w",
        "--watch",
        "watch",
        type=click.FloatRange(min=0.1),
        is_flag=False,
        flag_value=DEFAULT_INTERVAL,
        default=None,
        metavar="[SECONDS]",
        help=f"redraw every SECONDS (default {DEFAULT_INTERVAL:g}) until Ctrl-C; with -o json, one JSON line each",
    )
    return option(func)


def repeat(
    title: str,
    interval: float,
    count: int | None,
    fmt: str,
    fetch: Callable[[], Any],
    render: Callable[[Any], str],
    describe_error: Callable[[ClientError], str],
) -> None:
    """Fetch and print every `interval` seconds. On a terminal each frame replaces the last; in a pipe frames
    follow each other. A daemon error is shown in the frame and watching goes on (in JSON it ends gpuctl, as
    without --watch). Ctrl-C ends with exit code 0."""
    on_terminal = sys.stdout.isatty()
    frames = 0
    try:
        while True:
            frames += 1
            if fmt == "json":
                json_line(fetch())
            else:
                try:
                    body = render(fetch())
                except ClientError as exc:
                    body = describe_error(exc)
                header = f"every {interval:g}s: {title}   {time.strftime('%Y-%m-%d %H:%M:%S')}   (Ctrl-C to stop)"
                prefix = _CLEAR if on_terminal else ("" if frames == 1 else "\n")
                sys.stdout.write(f"{prefix}{header}\n\n{body}\n")
                sys.stdout.flush()
            if count is not None and frames >= count:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(0) from None
