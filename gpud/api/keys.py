"""Typed keys under which the daemon's services sit on the aiohttp applications."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gpud.modelstore import ModelStore
    from gpud.services import Services

# The composition root's bundle of every service; routes take what they need from it.
SERVICES: web.AppKey[Services] = web.AppKey("services")
# The model store on its own, so model routes need nothing else.
MODEL_STORE: web.AppKey[ModelStore] = web.AppKey("model_store")
