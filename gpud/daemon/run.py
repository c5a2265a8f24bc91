"""One gpud process: builds every service, serves the TCP and admin apps, handles signals, reloads, stops."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import signal
import socket
from collections.abc import Callable, Mapping
from typing import Any

from gpud import __version__
from gpud.api.app import AppServices, make_admin_app, make_public_app
from gpud.api.connections import ConnectionGuard, ConnectionLimits
from gpud.api.listener import serve
from gpud.api.logthrottle import BadRequestFilter, LogThrottle
from gpud.api.peercred import PeerPolicy
from gpud.daemon.examples import seed_demo_model
from gpud.daemon.listeners import UnixListener, bind_admin_socket, bind_tcp, passed_socket_group
from gpud.daemon.reload import LoadRequest, Reloader, status_line
from gpud.daemon.resources import LoopErrors, fit_caps, raise_fd_limit
from gpud.daemon.services import create_services
from gpud.daemon.systemd import Notifier, listen_sockets
from gpud.settings import Settings

logger = logging.getLogger(__name__)


class Daemon:
    """One gpud process: listens, serves, and shuts down cleanly on SIGTERM/SIGINT."""

    def __init__(self, request: LoadRequest, settings: Settings, notifier: Notifier | None = None) -> None:
        self._request = request
        self._settings = settings
        self._notifier = notifier or Notifier()
        self._stop = asyncio.Event()
        self._fd_limit = 1024

    def stop(self) -> None:
        """Ask the daemon to shut down (idempotent)."""
        self._stop.set()

    async def run(self) -> int:
        """Serve until stopped; return the process exit code."""
        self._fd_limit = raise_fd_limit()  # before anything opens descriptors
        loop_errors = LoopErrors()
        loop_errors.install(asyncio.get_running_loop())
        try:
            return await self._run()
        finally:
            loop_errors.uninstall(asyncio.get_running_loop())

    async def _run(self) -> int:
        services = create_services(self._settings)
        if self._request.dev:  # --dev fetches nothing: the demo presets' model must be in the cache
            await asyncio.to_thread(seed_demo_model, self._settings.model_cache_dir)
        reloader = Reloader(self._request, services, self._notifier)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(services.close)
            await services.start()
            await self._serve(services.for_api(reloader.reload), stack)
            self._install_signals(reloader)
            stack.callback(self._remove_signals)
            watchdog = asyncio.create_task(self._notifier.watchdog_forever())
            stack.push_async_callback(_cancel_all, [watchdog])
            self._notifier.ready(status_line(services))
            logger.info("gpud %s ready", __version__)
            await self._stop.wait()
            logger.info("shutting down")
            self._notifier.stopping()
            # End tasks while the sockets still serve, so every attached client receives its task_finish.
            await services.tasks.shutdown()
        logger.info("stopped")
        return 0

    async def _serve(self, services: AppServices, stack: contextlib.AsyncExitStack) -> None:
        settings = services.config.settings
        activated = listen_sockets()
        admin_sock = activated.get("admin") or _first_unix(activated)
        listener: UnixListener | None = None
        policy = PeerPolicy(settings.admin_socket_group)
        if admin_sock is None:
            listener = bind_admin_socket(settings.admin_socket, settings.admin_socket_group)
            stack.callback(listener.remove_file)
            admin_sock = listener.sock
        elif policy.gid is None:
            policy = _passed_socket_policy(admin_sock)
        tcp_sock = activated.get("http") or _first_tcp(activated)
        if tcp_sock is None:
            tcp_sock = bind_tcp(*settings.http_listen)
        # Each listener counts its connections apart: a flood on the public port leaves the admin socket room.
        caps = fit_caps(settings.max_connections, settings.admin_max_connections, self._fd_limit)
        throttle = LogThrottle()
        bad_requests = BadRequestFilter(throttle)
        logging.getLogger("aiohttp.server").addFilter(bad_requests)
        stack.callback(logging.getLogger("aiohttp.server").removeFilter, bad_requests)
        for name, app, sock, cap in (
            ("public", make_public_app(services), tcp_sock, caps.public),
            ("admin", make_admin_app(services, policy), admin_sock, caps.admin),
        ):
            limits = ConnectionLimits(cap, settings.header_timeout_seconds, settings.http_idle_timeout_seconds)
            await serve(app, sock, ConnectionGuard(name, limits, services.metrics, throttle), stack, throttle)
        host, port = tcp_sock.getsockname()[:2]
        logger.info(
            "public API on http://%s:%d (at most %d connections); admin API on %s (at most %d); open-file limit %d",
            host, port, caps.public, admin_sock.getsockname(), caps.admin, caps.fd_limit,
        )  # fmt: skip

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


def _passed_socket_policy(sock: socket.socket) -> PeerPolicy:
    """Admit the group that owns the socket systemd passed (its SocketGroup=), as the file's mode already does."""
    gid = passed_socket_group(sock)
    if gid is not None:
        logger.info("admin socket passed by systemd: admitting members of its group %s", _group_name(gid))
    return PeerPolicy(gid=gid)


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)


def _first_unix(sockets: Mapping[str, socket.socket]) -> socket.socket | None:
    return next((s for s in sockets.values() if s.family == socket.AF_UNIX), None)


def _first_tcp(sockets: Mapping[str, socket.socket]) -> socket.socket | None:
    return next((s for s in sockets.values() if s.family in (socket.AF_INET, socket.AF_INET6)), None)
