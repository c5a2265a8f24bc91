"""`gpud` command line: run the daemon, check a configuration, print the version."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import click

from gpud import __version__
from gpud.errors import ConfigError
from gpud.settings import Settings
from gpud.settings import load as load_settings

CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML settings file (default /etc/gpud/gpud.yaml, or $GPUD_CONFIG).",
)
# The exit status of a configuration error: the unit's RestartPreventExitStatus= names it, so a configuration that
# cannot start is not restarted in a loop.
EXIT_CONFIG = 2

DEV_OPTION = click.option(
    "--dev",
    is_flag=True,
    help="Embedded defaults for trying gpud: two static GPUs, a user socket, example presets.",
)


@click.group()
@click.version_option(__version__, prog_name="gpud")
def cli() -> None:
    """gpud: GPU task daemon (sessions, one-off tasks, SSE streaming)."""


@cli.command()
@CONFIG_OPTION
@DEV_OPTION
@click.option("--listen", "http_listen", default=None, help="Public API address host:port (GPUD_HTTP_LISTEN).")
@click.option("--admin-socket", default=None, help="Admin Unix socket path (GPUD_ADMIN_SOCKET).")
@click.option("--runtime", default=None, help="Worker runtime: podman, docker or process (GPUD_RUNTIME).")
@click.option("--gpu-backend", default=None, help="GPU inventory: auto, nvml or static (GPUD_GPU_BACKEND).")
@click.option("--log-level", default=None, help="debug, info, warning or error (GPUD_LOG_LEVEL).")
@click.option("--log-format", default=None, help="text or json: one JSON object per line (GPUD_LOG_FORMAT).")
def run(config_file: Path | None, dev: bool, **flags: Any) -> None:
    """Run the daemon in the foreground (systemd supervises it; it never daemonizes itself)."""
    import os

    from gpud.daemon import logs
    from gpud.daemon.listeners import AlreadyRunning, UnsafeSocketDirectory
    from gpud.daemon.reload import LoadRequest
    from gpud.daemon.run import Daemon

    request = LoadRequest(config_file=config_file, flags=flags, dev=dev, environ=dict(os.environ))
    settings = _load_or_exit(request.load)
    logs.setup_logging(settings.log_level, log_format=settings.log_format)
    try:
        code = asyncio.run(Daemon(request, settings).run())
    except (AlreadyRunning, UnsafeSocketDirectory) as exc:
        _fatal(str(exc))
        sys.exit(1)
    except ConfigError as exc:
        _print_problems(exc)
        sys.exit(EXIT_CONFIG)
    except Exception:
        # Logged rather than left to Python: under journald a bare traceback would land at info priority.
        logging.getLogger("gpud").critical("gpud stopped on an unexpected error", exc_info=True)
        sys.exit(1)
    sys.exit(code)


@cli.command("check-config")
@CONFIG_OPTION
@DEV_OPTION
def check_config(config_file: Path | None, dev: bool) -> None:
    """Validate settings and the presets file; print one line per problem."""
    from gpud.gpu.inventory import open_inventory
    from gpud.settings.presets import load_presets

    settings = _load_or_exit(lambda: load_settings(config_file, dev=dev))
    try:
        catalog = load_presets(settings.presets_file)
        # The GPUs are resolved as `gpud run` resolves them (NVML, or the static fallback), so a configuration that
        # passes here does not then stop `gpud run` with a GPU problem.
        inventory = open_inventory(settings.gpu_backend, settings.gpu_device_ids, settings.gpu_device_difficulty)
    except ConfigError as exc:
        _print_problems(exc)
        sys.exit(EXIT_CONFIG)
    inventory.close()
    source = settings.config_file or "built-in defaults and environment"
    gpus = ", ".join(f"{gpu.index}:{gpu.difficulty}" for gpu in inventory.gpus)
    click.echo(
        f"configuration OK ({source}); {len(catalog.all())} preset(s) in {catalog.source}; "
        f"{inventory.backend} GPU(s) {gpus}"
    )


@cli.command("settings")
@click.option("--markdown", is_flag=True, help="The README's reference table.")
def settings_reference(markdown: bool) -> None:
    """List every setting: environment name, YAML key, default, whether reload applies it, meaning."""
    from gpud.settings import SPECS
    from gpud.settings.reference import markdown_table, shown_default

    if markdown:
        click.echo(markdown_table())
        return
    for name, spec in SPECS.items():
        reload = "live" if spec.reloadable else "restart"
        click.echo(f"{spec.env[0]:<32} {name:<30} {reload:<8} default {shown_default(name)}")


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)


def _load_or_exit(load: Any) -> Settings:
    try:
        settings: Settings = load()
    except ConfigError as exc:
        _print_problems(exc)
        sys.exit(EXIT_CONFIG)
    return settings


def _print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        _fatal(f"config error: {problem}")


def _fatal(message: str) -> None:
    """One line on stderr; at priority err (`<3>`) when stderr is the journal, so `journalctl -p err` shows it."""
    from gpud.daemon.logs import journal_prefix

    prefix = journal_prefix(3)
    # A YAML error spans lines: each keeps the priority (journald reads the prefix per line).
    click.echo("\n".join(f"{prefix}gpud: {line}" for line in message.splitlines() or [""]), err=True)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
