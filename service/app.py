"""The FastAPI application factory: `uvicorn --factory service.app:create_app` (or `eas serve`).

Everything a route needs hangs off `app.state` (settings, metrics, the service with its runner registry,
token verifiers) and reaches routes through `service.deps`; nothing is a module-level global, so several
apps (tests) can live in one process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from model_store import JobRecord
from service.admin import routes as admin
from service.admin.activation import Activator
from service.admin.routes import AdminState
from service.admin.supervisor import JobSupervisor
from service.auth import TokenVerifier
from service.errors import install_error_handlers
from service.lifecycle import Loader, Resolver, Service, default_loader, run_in_daemon_thread
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.openapi import ERROR_RESPONSES, add_doc_routes
from service.penalties import ClientPenalties
from service.routes import answer, chat, health, metrics, models
from service.runner.follower import start_follower
from service.runner.resolve import resolve_variants
from service.settings import Settings
from service.shadow import ShadowMirror

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    await service.start()  # loads in the background; /health/ready says 503 until warm
    admin = await start_admin(app) if app.state.admin_auth.enabled else None
    # Every replica follows the registry's active version (on by default with a PostgreSQL registry).
    follower = await start_follower(service, admin.store if admin else None, admin.activator if admin else None)
    try:
        yield
    finally:
        if follower is not None:
            await follower.stop()
        if admin is not None:
            await run_in_daemon_thread(admin.supervisor.shutdown, service.settings.shutdown_timeout_s)
        if app.state.shadow is not None:
            await app.state.shadow.close()  # mirrored requests are never worth waiting for at shutdown
        await service.close()  # drain: finish admitted work up to the shutdown timeout


async def start_admin(app: FastAPI) -> AdminState:
    """Open the store (seeding a fresh one, service/seed.py), fail the jobs a previous server left unfinished,
    start supervising workers (service/admin/supervisor.py), which hot-activates a job that succeeded and asked
    for it: in the server, once loaded and warm."""
    from service.seed import open_seeded  # path-only deployments without admin never touch the store

    service: Service = app.state.service
    store = await run_in_daemon_thread(open_seeded, service.settings.model_store)
    activator = Activator(service, store, asyncio.get_running_loop())
    metrics: Metrics = app.state.metrics

    def on_finished(job: JobRecord) -> None:  # supervisor thread; exactly once per job and supervisor
        metrics.observe_conversion_job(job.status, job.started_at, job.finished_at)

    supervisor = JobSupervisor(store, service.settings, activate=activator.activate_from_thread,
                               on_finished=on_finished, on_workers_changed=service.threads.set_running_jobs)
    # Read at scrape time: always the supervisor's own count, with no bookkeeping to drift.
    metrics.conversion_jobs_in_progress.set_function(lambda: len(supervisor.running_pids()))
    interrupted = await run_in_daemon_thread(supervisor.start)
    if interrupted:
        log.warning("marked %d interrupted conversion job(s) failed: %s", len(interrupted), ", ".join(interrupted))
    app.state.admin = AdminState(store, supervisor, activator)
    return app.state.admin


def create_app(
    settings: Settings | None = None,
    *,
    loader: Loader = default_loader,
    resolver: Resolver = resolve_variants,
) -> FastAPI:
    """Build the app. `loader`/`resolver` are seams for tests and later hot activation."""
    settings = settings or Settings()
    # The API documents are served by our own routes (service/openapi.py add_doc_routes), behind the API
    # token when one is set (issue 17): they describe the admin routes too.
    app = FastAPI(title="eas-serve", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  summary="Vision-language QA with EAS attention skipping, served beside its baseline.",
                  openapi_url=None, docs_url=None, redoc_url=None)
    # No trailing-slash redirects: Starlette builds their Location from the Host header, before any
    # authentication (issue 17). `/v1/answer/` is a 404 like any other unknown path.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.metrics = app_metrics = Metrics()
    app.state.service = Service(settings, app_metrics, loader=loader, resolver=resolver)
    # Off by default; when on, service.inference hands every answered request to it (see service/shadow.py).
    app.state.shadow = (ShadowMirror.from_settings(app.state.service, app_metrics, settings)
                        if settings.shadow_fraction > 0 else None)
    app.state.api_auth = TokenVerifier(settings.api_token)
    app.state.admin_auth = TokenVerifier(settings.admin_token)
    install_error_handlers(app)
    # Shared with the connection layer (service/server.py), which charges the 431s and 408s it sends.
    app.state.penalties = penalties = (
        ClientPenalties(settings.client_error_burst, settings.client_error_rate_per_s, settings.client_error_delay_s)
        if settings.client_error_burst > 0 else None)
    app.add_middleware(RequestContextMiddleware, metrics=app_metrics, max_body_bytes=settings.max_body_bytes,
                       penalties=penalties)
    app.state.admin = None
    for module in (answer, chat, models, health, metrics, admin):
        app.include_router(module.router)
    add_doc_routes(app)
    return app
