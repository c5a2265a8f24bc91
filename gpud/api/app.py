"""The two aiohttp applications: public (TCP, API keys) and admin (Unix socket, peer credentials)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from gpud.api import keys
from gpud.api.middleware import api_key_middleware, error_middleware, metrics_middleware, peer_middleware
from gpud.api.peercred import PeerPolicy
from gpud.api.routes.admin import add_admin_routes
from gpud.api.routes.health import add_health_routes
from gpud.api.routes.logs import add_log_routes
from gpud.api.routes.models import add_model_routes
from gpud.api.routes.presets import add_preset_routes
from gpud.api.routes.sessions import add_session_routes
from gpud.api.routes.tasks import add_task_routes
from gpud.gpu.inventory import GpuInventory
from gpud.gpu.scheduler import Scheduler
from gpud.metrics import Metrics
from gpud.modelstore import ModelStore
from gpud.runtime.base import ContainerRuntime
from gpud.settings import LiveConfig
from gpud.work.service import TaskService
from gpud.work.sessions.manager import SessionManager

if TYPE_CHECKING:
    from gpud.fleet.service import Fleet


@dataclass(frozen=True)
class AppServices:
    """Everything the apps serve from; each part goes under its own app key."""

    config: LiveConfig
    inventory: GpuInventory
    scheduler: Scheduler
    runtime: ContainerRuntime
    models: ModelStore
    tasks: TaskService
    sessions: SessionManager
    metrics: Metrics
    started: keys.ProcessStart
    reload: keys.ReloadFunction | None = None
    fleet: Fleet | None = None  # fleet mode only (GPUD_ETCD_ENDPOINTS)


def _shared_app(services: AppServices, name: str, auth: Middleware, names_holders: bool) -> web.Application:
    """An app with the routes both sockets serve; `auth` decides who may call it; `names_holders` whether GPU
    reports (/health, /api/gpus) name the session or task holding each GPU."""
    app = web.Application(
        middlewares=[metrics_middleware(name), error_middleware, auth],
        client_max_size=services.config.settings.max_request_bytes,
    )
    app[keys.CONFIG] = services.config
    app[keys.INVENTORY] = services.inventory
    app[keys.SCHEDULER] = services.scheduler
    app[keys.RUNTIME] = services.runtime
    app[keys.MODEL_STORE] = services.models
    app[keys.TASKS] = services.tasks
    app[keys.SESSIONS] = services.sessions
    app[keys.METRICS] = services.metrics
    app[keys.STARTED] = services.started
    app[keys.RELOAD] = services.reload
    app[keys.NAMES_HOLDERS] = names_holders
    add_health_routes(app)
    add_preset_routes(app)
    add_task_routes(app)
    add_session_routes(app)
    if services.fleet is not None:
        from gpud.api.fleet import install_fleet  # imported only in fleet mode: no cost on a single host

        install_fleet(app, services.fleet, forwards=name == "public")
    return app


def make_public_app(services: AppServices) -> web.Application:
    """The TCP app: tasks, sessions, health and metrics, behind an API key (X-API-Key or Authorization: Bearer;
    /health without: it names no holder)."""
    return _shared_app(services, "public", api_key_middleware, names_holders=False)


def make_admin_app(services: AppServices, policy: PeerPolicy) -> web.Application:
    """The Unix-socket app: everything public plus operator routes; the peer's credentials are the auth."""
    app = _shared_app(services, "admin", peer_middleware(policy), names_holders=True)
    add_admin_routes(app)
    add_log_routes(app)
    add_model_routes(app)
    return app
