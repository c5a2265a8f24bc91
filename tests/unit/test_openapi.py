"""docs/openapi.yaml describes exactly the routes the two apps serve (public ones, and admin-only ones marked)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from gpud.api.app import make_admin_app, make_public_app
from gpud.api.peercred import PeerPolicy
from gpud.daemon.services import Services, create_services
from gpud.settings import load

REPO = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
METHODS = {"get", "post", "put", "delete", "patch"}

Route = tuple[str, str]


def documented(admin: bool, fleet: bool = False) -> set[Route]:
    """(METHOD, path) pairs the document lists for one app (the admin app serves the public routes too; routes
    marked `x-gpud-mode: fleet` exist only in fleet mode)."""
    routes = set()
    for path, item in SPEC["paths"].items():
        if item.get("x-gpud-app") == "admin" and not admin:
            continue
        if item.get("x-gpud-mode") == "fleet" and not fleet:
            continue
        routes |= {(method.upper(), path) for method in item if method in METHODS}
    return routes


def served(app: web.Application) -> set[Route]:
    """(METHOD, path template) pairs an app routes (HEAD, added by aiohttp for every GET, left out)."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def environment(tmp_path: Path) -> dict[str, str]:
    return {
        "GPUD_GPU_BACKEND": "static",
        "GPU_DEVICE_IDS": "0",
        "GPUD_RUNTIME": "process",
        "GPUD_STATE_DIR": str(tmp_path / "state"),
        "MODEL_CACHE_DIR": str(tmp_path / "models"),
        "GPUD_PRESETS_FILE": str(REPO / "etc" / "gpud" / "models.yaml"),
    }


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    built = create_services(load(None, environ=environment(tmp_path)))
    yield built
    await built.runtime.close()


@pytest.fixture
async def fleet_services(tmp_path: Path) -> AsyncIterator[Services]:
    """Fleet mode, not started: building the apps needs no etcd."""
    environ = {**environment(tmp_path), "GPUD_ETCD_ENDPOINTS": "http://127.0.0.1:9", "GPUD_FLEET_KEY": "fleet-key"}
    environ["GPUD_ADVERTISE_URL"] = "http://127.0.0.1:8001"
    built = create_services(load(None, environ=environ))
    yield built
    await built.runtime.close()


async def test_the_public_app_serves_what_the_document_says(services: Services) -> None:
    assert served(make_public_app(services.for_api())) == documented(admin=False)


async def test_the_admin_app_serves_what_the_document_says(services: Services) -> None:
    assert served(make_admin_app(services.for_api(), PeerPolicy(None))) == documented(admin=True)


async def test_fleet_mode_serves_the_fleet_routes_too(fleet_services: Services) -> None:
    assert served(make_public_app(fleet_services.for_api())) == documented(admin=False, fleet=True)
    admin = make_admin_app(fleet_services.for_api(), PeerPolicy(None))
    assert served(admin) == documented(admin=True, fleet=True)


def test_every_operation_documents_its_responses() -> None:
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                assert operation.get("summary") and operation.get("responses"), f"{method.upper()} {path}"
