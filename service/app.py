"""The FastAPI application factory: `uvicorn --factory service.app:create_app` (or `eas serve`).

Everything a route needs hangs off `app.state` (settings, metrics, the service with its runner registry,
token verifiers) and reaches routes through `service.deps`; nothing is a module-level global, so several
apps (tests) can live in one process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.auth import TokenVerifier
from service.errors import install_error_handlers
from service.lifecycle import Loader, Resolver, Service, default_loader
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.routes import answer, chat, health, metrics, models
from service.runner.resolve import resolve_variants
from service.settings import Settings

log = logging.getLogger("service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    await service.start()  # loads in the background; /health/ready says 503 until warm
    try:
        yield
    finally:
        await service.close()  # drain: finish admitted work up to the shutdown timeout


def create_app(
    settings: Settings | None = None,
    *,
    loader: Loader = default_loader,
    resolver: Resolver = resolve_variants,
) -> FastAPI:
    """Build the app. `loader`/`resolver` are seams for tests and later hot activation."""
    settings = settings or Settings()
    app = FastAPI(title="eas-serve", version="0.1.0", lifespan=lifespan,
                  summary="Vision-language QA with EAS attention skipping, served beside its baseline.")
    app.state.settings = settings
    app.state.metrics = app_metrics = Metrics()
    app.state.service = Service(settings, app_metrics, loader=loader, resolver=resolver)
    app.state.api_auth = TokenVerifier(settings.api_token)
    app.state.admin_auth = TokenVerifier(settings.admin_token)
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=app_metrics, max_body_bytes=settings.max_body_bytes)
    for module in (answer, chat, models, health, metrics):
        app.include_router(module.router)
    return app
