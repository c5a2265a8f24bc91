"""The two aiohttp applications: public (TCP, API keys) and admin (Unix socket, peer credentials)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from gpud.api.keys import MODEL_STORE, SERVICES
from gpud.api.middleware import api_key_middleware, error_middleware, metrics_middleware, peer_middleware
from gpud.api.peercred import PeerPolicy
from gpud.api.routes_admin import add_admin_routes
from gpud.api.routes_health import add_health_routes
from gpud.api.routes_logs import add_log_routes
from gpud.api.routes_models import add_model_routes
from gpud.api.routes_presets import add_preset_routes
from gpud.api.routes_sessions import add_session_routes
from gpud.api.routes_tasks import add_task_routes
from gpud.services import Services


def _shared_app(services: Services, name: str, auth: Middleware) -> web.Application:
    """An app with the routes both sockets serve; `auth` decides who may call it."""
    app = web.Application(
        middlewares=[metrics_middleware(name), error_middleware, auth],
        client_max_size=services.settings.max_request_bytes,
    )
    app[SERVICES] = services
    add_health_routes(app)
    add_preset_routes(app)
    add_task_routes(app)
    add_session_routes(app)
    return app


def make_public_app(services: Services) -> web.Application:
    """The TCP app: tasks, sessions, health and metrics, behind X-API-Key."""
    return _shared_app(services, "public", api_key_middleware)


def make_admin_app(services: Services, policy: PeerPolicy) -> web.Application:
    """The Unix-socket app: everything public plus operator routes; the peer's credentials are the auth."""
    app = _shared_app(services, "admin", peer_middleware(policy))
    add_admin_routes(app)
    add_log_routes(app)
    app[MODEL_STORE] = services.models
    add_model_routes(app)
    return app
