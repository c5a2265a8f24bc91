"""gpuctl command line (click)."""

from __future__ import annotations

import click

from gpud import __version__


@click.group()
@click.version_option(__version__, prog_name="gpuctl")
def cli() -> None:
    """Operate a gpud host over its admin socket."""


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    cli()
