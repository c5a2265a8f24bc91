"""Admin routes for the model cache: list, show, pre-warm, remove, verify."""

from __future__ import annotations

from aiohttp import web

from gpud.api.keys import MODEL_STORE


async def list_models(request: web.Request) -> web.Response:
    """GET /api/models: every cached (or fetching) model."""
    store = request.app[MODEL_STORE]
    return web.json_response({"models": [m.to_dict() for m in store.list()]})


async def get_model(request: web.Request) -> web.Response:
    """GET /api/models/{model_id}: one model; 404 model_not_cached if absent."""
    store = request.app[MODEL_STORE]
    return web.json_response(store.info(request.match_info["model_id"]).to_dict())


async def fetch_model(request: web.Request) -> web.Response:
    """POST /api/models/{model_id}/fetch: pre-warm; answers when the model is in the cache."""
    store = request.app[MODEL_STORE]
    info = await store.prefetch(request.match_info["model_id"])
    return web.json_response(info.to_dict())


async def delete_model(request: web.Request) -> web.Response:
    """DELETE /api/models/{model_id}: remove; 409 model_in_use while a worker has it mounted."""
    store = request.app[MODEL_STORE]
    await store.remove(request.match_info["model_id"])
    return web.Response(status=204)


async def verify_model(request: web.Request) -> web.Response:
    """POST /api/models/{model_id}/verify: compare files with the manifest (200 with ok true/false/null)."""
    store = request.app[MODEL_STORE]
    result = await store.verify(request.match_info["model_id"])
    return web.json_response(result.to_dict())


def add_model_routes(app: web.Application) -> None:
    """Register the model admin routes on app (which must hold the store under MODEL_STORE)."""
    app.router.add_get("/api/models", list_models)
    app.router.add_get("/api/models/{model_id}", get_model)
    app.router.add_post("/api/models/{model_id}/fetch", fetch_model)
    app.router.add_delete("/api/models/{model_id}", delete_model)
    app.router.add_post("/api/models/{model_id}/verify", verify_model)
