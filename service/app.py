"""The FastAPI gateway: ``create_app(settings)``; nothing happens at import.

The gateway never imports torch (a test checks it): it validates, stores inputs, enqueues, and
reads results. All tensor work happens in the workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from redis import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from history.store import HistoryStore
from models.datasets import DataCatalog
from models.registry_store import open_registries
from models.store import open_store
from service import docs_ui, errors
from service.errors import Problem, problem_response
from service.forms import JsonDepthLimit
from service.limits import TeamLimits
from service.metrics import Instrument, registry_for
from service.openapi import document_problems
from service.queueing import Queues
from service.routes import (
    attacks,
    audits,
    datasets,
    defenses,
    generators,
    health,
    history,
    infer,
    jobs,
    models,
    oip,
)
from service.settings import Settings
from service.ui import pages as ui_pages

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether or not Content-Length is set.
    ``uploads`` raises the limit for the routes that take files (path -> limit)."""

    def __init__(self, app: ASGIApp, limit: int, uploads: dict[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.uploads = uploads or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.uploads.get(scope.get("path", "").rstrip("/"), self.limit)
        too_large = Problem(413, f"expected a request body of at most {limit} bytes",
                            code="body-too-large")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await problem_response(too_large, scope.get("path"))(scope, receive, send)
            return
        if length is not None:
            await self.app(scope, receive, send)  # the server enforces the declared length
            return
        # No Content-Length (chunked): buffer up to the limit before the app sees anything.
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > limit:
                await problem_response(too_large, scope.get("path"))(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def create_app(settings: Settings, redis: Redis | None = None) -> FastAPI:
    """Build the gateway for ``settings`` (Redis from ``settings.redis_url`` unless given)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.redis.close()
        app.state.history.close()

    app = FastAPI(
        title="Adversa",
        version="1.0.0",
        summary="Adversarial-robustness service: attack, defend and audit image classifiers",
        lifespan=lifespan,
        docs_url=None,  # served by docs_ui from packaged assets, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.redis = redis or Redis.from_url(settings.redis_url or DEFAULT_REDIS_URL)
    app.state.history = HistoryStore(settings.history_database_url)  # migrated on first use
    app.state.queues = Queues(app.state.redis, settings, app.state.history,
                              TeamLimits(app.state.redis, settings))
    app.state.metrics = registry_for(app.state.queues)  # scraped with the process-wide instruments
    app.state.store = open_store(settings)
    registries = open_registries(settings, app.state.store)  # the var dir, or the S3 store
    app.state.index = registries.models
    app.state.generators = registries.generators
    app.state.data = DataCatalog(settings.data_dir, settings.datasets_root, app.state.store,
                                 index=registries.datasets)
    errors.install(app)
    for module in (health, oip, models, datasets, infer, generators, attacks, defenses, audits, jobs, history):
        app.include_router(module.router)
    docs_ui.install(app)
    ui_pages.install(app)  # /ui: the web pages, and GET /v1/audits/{id}/report-link
    app.add_middleware(JsonDepthLimit)  # inside BodyLimit: it reads bodies already bounded
    # multipart framing and the card travel beside the file: 1 MiB of slack
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes,
                       uploads={"/v1/models": settings.max_model_bytes + 2**20,
                                "/v1/datasets": settings.max_dataset_bytes + 2**20})
    app.add_middleware(oip.BinaryBodies)  # outside JsonDepthLimit: raw tensors are not JSON
    app.add_middleware(oip.OIPErrors)  # /v2 errors in the protocol's shape, whoever raised them
    app.add_middleware(Instrument)  # outermost: counts every answer, the middlewares' too
    _document_hand_read_bodies(app)
    document_problems(app)  # after every route and schema: it lists what each can answer
    return app


def _document_hand_read_bodies(app: FastAPI) -> None:
    """The attack route (JSON or multipart) and the model and data-set uploads (multipart) read
    their bodies by hand; publish the schemas that their ``openapi_extra`` bodies refer to."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for module in (attacks, models, datasets):
            for name, definition in module.OPENAPI_SCHEMAS.items():
                components.setdefault(name, definition)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
