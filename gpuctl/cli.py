"""gpuctl command line (click): the host-level commands; work commands (sessions, tasks, submit, logs) in work.py."""

from __future__ import annotations

import functools

import click

from gpuctl.client import resolve_socket
from gpuctl.context import (
    FORMAT_HELP,
    FORMATS,
    App,
    ExitCode,
    GpuctlGroup,
    describe,
    environ,
    output_option,
    pass_app,
    render,
    show,
)
from gpuctl.fleet import fleet
from gpuctl.output import cell
from gpuctl.unixhttp import quote_segment
from gpuctl.watch import repeat, watch_options
from gpuctl.work import logs, sessions, submit, tasks

# Read from gpud/__init__.py without importing it would be nicer, but that module is a single constant: cheap.
from gpud import __version__


def _q(value: str) -> str:
    """A path segment, quoted."""
    return quote_segment(value)


@click.group(cls=GpuctlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpuctl")
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    help="gpud's admin socket [default: $GPUD_SOCKET, else /run/gpud/gpud.sock, else the `gpud run --dev` socket]",
)
@click.option(
    "-o", "--output", "fmt", type=click.Choice(FORMATS), default=None, help=f"{FORMAT_HELP}, for every command"
)
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, fmt: str | None) -> None:
    """Operate a gpud host over its admin Unix socket."""
    ctx.obj = App(resolve_socket(socket_path, environ()), fmt)


@cli.command()
def version() -> None:
    """Print gpuctl's version."""
    click.echo(__version__)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish).

    \b
    bash (~/.bashrc):   eval "$(gpuctl completion bash)"
    zsh (~/.zshrc):     eval "$(gpuctl completion zsh)"
    fish:               gpuctl completion fish > ~/.config/fish/completions/gpuctl.fish
    """
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)
    assert completer is not None  # click knows all three
    click.echo(completer(ctx.find_root().command, {}, "gpuctl", "_GPUCTL_COMPLETE").source())


@cli.command()
@output_option
@watch_options
@pass_app
def status(app: App, fmt: str, watch: float | None, count: int | None) -> None:
    """Health, version, uptime, runtime, GPUs, sessions and tasks."""

    def health() -> object:
        # /health answers 503 with the full report when degraded: that is a result to show, not an error.
        return app.client().request("GET", "/health", accept=(503,))

    where = f"{app.socket.path} ({app.socket.source})"
    if watch is None:
        show(app, fmt, health(), "status", socket=where)
        return
    repeat("gpuctl status", watch, count, fmt, health, functools.partial(render, app, "status", socket=where), describe)


@cli.command()
@output_option
@pass_app
def gpus(app: App, fmt: str) -> None:
    """Per GPU: difficulty, memory, utilization, temperature, lease, health, drained (and why)."""
    body = app.client().get("/api/gpus")
    show(app, fmt, body, "gpus", "gpus")


@cli.group()
def gpu() -> None:
    """Drain or undrain one GPU."""


@gpu.command()
@click.argument("gpu_id")
@output_option
@pass_app
def drain(app: App, gpu_id: str, fmt: str) -> None:
    """No new leases on GPU_ID; running work finishes."""
    body = app.client().post(f"/api/gpus/{_q(gpu_id)}/drain")
    show(app, fmt, body, lambda g, s: f"GPU {g['id']} drained: no new leases; running work finishes")


@gpu.command()
@click.argument("gpu_id")
@output_option
@pass_app
def undrain(app: App, gpu_id: str, fmt: str) -> None:
    """Let GPU_ID take new leases again."""
    body = app.client().post(f"/api/gpus/{_q(gpu_id)}/undrain")
    show(app, fmt, body, lambda g, s: f"GPU {g['id']} undrained: takes new leases")


@cli.command()
@output_option
@pass_app
def presets(app: App, fmt: str) -> None:
    """The models and presets this host can run."""
    body = app.client().get("/api/presets")
    show(app, fmt, body, "presets", "presets")


@cli.command()
@output_option
@pass_app
def reload(app: App, fmt: str) -> None:
    """Re-read settings and presets (the same as SIGHUP); exit 1 if the new configuration was refused."""
    body = app.client().post("/api/reload")
    show(app, fmt, body, "reload")
    if not body.get("reloaded"):
        raise click.exceptions.Exit(ExitCode.API_ERROR)


@cli.group()
def models() -> None:
    """The model cache: list, fetch (pre-warm), remove, verify."""


@models.command("ls")
@output_option
@pass_app
def models_ls(app: App, fmt: str) -> None:
    """Cached models (and those being fetched)."""
    body = app.client().get("/api/models")
    show(app, fmt, body, "models", "models")


@models.command("fetch")
@click.argument("model_id")
@output_option
@pass_app
def models_fetch(app: App, model_id: str, fmt: str) -> None:
    """Fetch MODEL_ID into the cache now; returns when it is there."""
    body = app.client().post(f"/api/models/{_q(model_id)}/fetch", long=True)
    show(app, fmt, body, "model")


@models.command("rm")
@click.argument("model_id")
@output_option
@pass_app
def models_rm(app: App, model_id: str, fmt: str) -> None:
    """Remove MODEL_ID from the cache (refused while a worker uses it)."""
    app.client().delete(f"/api/models/{_q(model_id)}")
    show(app, fmt, {"model_id": model_id, "removed": True}, lambda b, s: f"removed model {cell(b['model_id'])}")


@models.command("verify")
@click.argument("model_id")
@output_option
@pass_app
def models_verify(app: App, model_id: str, fmt: str) -> None:
    """Check MODEL_ID's files against its manifest; exit 1 when they do not match."""
    body = app.client().post(f"/api/models/{_q(model_id)}/verify", long=True)
    show(app, fmt, body, "verify")
    if body.get("ok") is False:
        raise click.exceptions.Exit(ExitCode.API_ERROR)


cli.add_command(sessions)
cli.add_command(tasks)
cli.add_command(submit)
cli.add_command(logs)
cli.add_command(fleet)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="gpuctl")
