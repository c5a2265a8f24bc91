"""Admin model routes over real HTTP (aiohttp test client), with a stand-in for the lead's error middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gpud.api.keys import MODEL_STORE
from gpud.api.routes.models import add_model_routes
from gpud.errors import ErrorKind, GpudError
from gpud.modelstore import ModelStore
from tests.fileservice import FileService

STATUS = {ErrorKind.INVALID: 400, ErrorKind.NOT_FOUND: 404, ErrorKind.CONFLICT: 409, ErrorKind.UNAVAILABLE: 503}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The contract of gpud/api's error middleware: domain error -> {"error": {code, message}} + status."""
    try:
        return await handler(request)
    except GpudError as exc:
        return web.json_response({"error": exc.to_dict()}, status=STATUS.get(exc.kind, 500))


@pytest.fixture
async def svc() -> AsyncIterator[FileService]:
    service = FileService()
    service.add_zeros("m", 1 << 20)
    service.set("m", chunk_delay=0.001)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def setup(tmp_path: Path, svc: FileService, aiohttp_client: Any) -> AsyncIterator[tuple[TestClient, ModelStore]]:
    store = ModelStore(tmp_path / "cache", file_service_url=svc.url, internal_key=svc.key, auto_fetch=False)
    await store.start()
    app = web.Application(middlewares=[errors])
    app[MODEL_STORE] = store
    add_model_routes(app)
    yield await aiohttp_client(app), store
    await store.close()


async def test_model_admin_flow(setup: tuple[TestClient, ModelStore], svc: FileService) -> None:
    client, store = setup
    assert (await (await client.get("/api/models")).json()) == {"models": []}
    resp = await client.get("/api/models/m")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_cached"

    resp = await client.post("/api/models/m/fetch")
    assert resp.status == 200
    body = await resp.json()
    assert body["complete"] and body["has_manifest"] and body["size_bytes"] == 1 << 20
    assert svc.requests["m"] == 1

    listed = (await (await client.get("/api/models")).json())["models"]
    assert [m["model_id"] for m in listed] == ["m"]
    resp = await client.post("/api/models/m/verify")
    assert resp.status == 200 and (await resp.json())["ok"] is True

    store.acquire("m", "worker-7")
    assert (await (await client.get("/api/models/m")).json())["in_use_by"] == ["worker-7"]
    resp = await client.delete("/api/models/m")
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "model_in_use"
    store.release("m", "worker-7")
    assert (await client.delete("/api/models/m")).status == 204
    assert (await client.get("/api/models/m")).status == 404


async def test_fetch_failure_is_reported(setup: tuple[TestClient, ModelStore], svc: FileService) -> None:
    client, _ = setup
    svc.set("m", status=404)
    resp = await client.post("/api/models/m/fetch")
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["code"] == "model_fetch_failed" and "404" in error["message"]


@pytest.mark.parametrize("raw", ["..%2Fetc", "%252e%252e", "a%00b", ".tmp-x", "x" * 200, "%2e%2e%2f%2e%2e%2fetc"])
async def test_traversal_ids_are_400(setup: tuple[TestClient, ModelStore], svc: FileService, raw: str) -> None:
    client, _ = setup
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/fetch"), ("POST", "/verify")):
        resp = await client.request(method, f"/api/models/{raw}{suffix}")
        assert resp.status == 400, (method, raw, await resp.text())
        assert (await resp.json())["error"]["code"] == "invalid_model_id"
    assert sum(svc.requests.values()) == 0
