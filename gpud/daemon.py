"""The composition root: builds every service, serves the TCP and admin apps, handles signals, reloads, stops."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from gpud import __version__, config, logs
from gpud.api.app import make_admin_app, make_public_app
from gpud.api.peercred import PeerPolicy
from gpud.config import RELOADABLE, Settings
from gpud.errors import ConfigError
from gpud.listeners import UnixListener, bind_admin_socket, bind_tcp
from gpud.presets import load_presets
from gpud.services import Services, create_services
from gpud.systemd import Notifier, listen_sockets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRequest:
    """How settings were asked for at start, so a reload resolves them the same way."""

    config_file: Path | None
    flags: Mapping[str, Any]
    dev: bool
    environ: Mapping[str, str]

    def load(self) -> Settings:
        """Resolve settings again from every layer."""
        return config.load(self.config_file, environ=self.environ, flags=self.flags, dev=self.dev)


class Reloader:
    """Applies a new configuration in place (SIGHUP or POST /api/reload) without dropping connections."""

    def __init__(self, request: LoadRequest, services: Services, notifier: Notifier) -> None:
        self._request = request
        self._services = services
        self._notifier = notifier
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        """Re-read settings and presets; apply what may change live, report what needs a restart."""
        async with self._lock:
            self._notifier.reloading()
            try:
                result = await asyncio.get_running_loop().run_in_executor(None, self._prepare)
            except ConfigError as exc:
                self._services.metrics.reloads.labels("failed").inc()
                logger.error("reload failed, keeping the running configuration:\n%s", exc)
                self._notifier.ready("reload failed; running with the previous configuration")
                return {"reloaded": False, "problems": exc.problems}
            settings, presets, changed = result
            self._apply(settings, presets, changed)
            return {"reloaded": True, **changed}

    def _prepare(self) -> tuple[Settings, Any, dict[str, list[str]]]:
        old = self._services
        settings = self._request.load()
        presets = load_presets(settings.presets_file)
        fields = settings.changed_fields(old.settings)
        changed = {
            "applied": [name for name in fields if name in RELOADABLE],
            "needs_restart": [name for name in fields if name not in RELOADABLE],
            "presets_changed": _preset_changes(old.presets.all(), presets.all()),
        }
        return settings, presets, changed

    def _apply(self, settings: Settings, presets: Any, changed: dict[str, list[str]]) -> None:
        services = self._services
        # Settings that need a restart keep their running values; only reloadable fields are taken.
        live = {name: getattr(settings, name) for name in changed["applied"]}
        services.settings = _replace(services.settings, live)
        services.presets = presets
        services.inventory.retag(services.settings.gpu_device_difficulty)
        logs.set_level(services.settings.log_level)
        services.metrics.reloads.labels("ok").inc()
        logger.info(
            "reloaded: settings changed %s; presets changed %s; needing a restart (not applied) %s",
            changed["applied"] or "none",
            changed["presets_changed"] or "none",
            changed["needs_restart"] or "none",
        )
        self._notifier.ready(_status_line(services))


def _replace(settings: Settings, values: Mapping[str, Any]) -> Settings:
    return dataclasses.replace(settings, **values)


def _preset_changes(old: list[Any], new: list[Any]) -> list[str]:
    """Keys (model/preset) added, removed or modified."""
    before = {p.key: p for p in old}
    after = {p.key: p for p in new}
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def _status_line(services: Services) -> str:
    leased = len(services.scheduler.leases())
    return f"serving; {len(services.inventory.gpus)} GPU(s), {leased} leased"


class Daemon:
    """One gpud process: listens, serves, and shuts down cleanly on SIGTERM/SIGINT."""

    def __init__(self, request: LoadRequest, settings: Settings, notifier: Notifier | None = None) -> None:
        self._request = request
        self._settings = settings
        self._notifier = notifier or Notifier()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask the daemon to shut down (idempotent)."""
        self._stop.set()

    async def run(self) -> int:
        """Serve until stopped; return the process exit code."""
        services = create_services(self._settings)
        services.reloader = Reloader(self._request, services, self._notifier)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(services.close)
            await services.start()
            await self._serve(services, stack)
            self._install_signals(services.reloader)
            stack.callback(self._remove_signals)
            watchdog = asyncio.create_task(self._notifier.watchdog_forever())
            stack.push_async_callback(_cancel_all, [watchdog])
            self._notifier.ready(_status_line(services))
            logger.info("gpud %s ready", __version__)
            await self._stop.wait()
            logger.info("shutting down")
            self._notifier.stopping()
            # End tasks while the sockets still serve, so every attached client receives its task_finish.
            await services.tasks.shutdown()
        logger.info("stopped")
        return 0

    async def _serve(self, services: Services, stack: contextlib.AsyncExitStack) -> None:
        settings = services.settings
        activated = listen_sockets()
        admin_sock = activated.get("admin") or _first_unix(activated)
        listener: UnixListener | None = None
        if admin_sock is None:
            listener = bind_admin_socket(settings.admin_socket, settings.admin_socket_group)
            stack.callback(listener.remove_file)
            admin_sock = listener.sock
        tcp_sock = activated.get("http") or _first_tcp(activated)
        if tcp_sock is None:
            tcp_sock = bind_tcp(*settings.http_listen)
        for app, sock in (
            (make_public_app(services), tcp_sock),
            (make_admin_app(services, PeerPolicy(settings.admin_socket_group)), admin_sock),
        ):
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.SockSite(runner, sock, shutdown_timeout=5.0).start()
        host, port = tcp_sock.getsockname()[:2]
        logger.info("public API on http://%s:%d; admin API on %s", host, port, admin_sock.getsockname())

    def _install_signals(self, reloader: Reloader) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, _spawn(reloader.reload))

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _spawn(factory: Callable[[], Any]) -> Callable[[], None]:
    """A signal handler that starts a coroutine and keeps a reference until it ends."""
    running: set[asyncio.Task[Any]] = set()

    def handler() -> None:
        task = asyncio.ensure_future(factory())
        running.add(task)
        task.add_done_callback(running.discard)

    return handler


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _first_unix(sockets: Mapping[str, socket.socket]) -> socket.socket | None:
    return next((s for s in sockets.values() if s.family == socket.AF_UNIX), None)


def _first_tcp(sockets: Mapping[str, socket.socket]) -> socket.socket | None:
    return next((s for s in sockets.values() if s.family in (socket.AF_INET, socket.AF_INET6)), None)
