"""FastAPI dependencies: the service objects live on `app.state` and reach routes only through these.

They are `async def` on purpose although they do no I/O: FastAPI runs plain `def` dependencies in a
thread pool, a thread hop (and GIL hand-off) per dependency per request.

Inference routes run, in this order (serving-conventions §2): authentication (401) → readiness (503)
→ declared Content-Length (413). Body parsing, admission and image decoding follow in the route.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.auth import TokenVerifier
from service.errors import BadRequest, Forbidden, PayloadTooLarge, Unauthorized
from service.lifecycle import Service
from service.metrics import Metrics
from service.settings import Settings


async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_api_token(request: Request) -> None:
    verifier: TokenVerifier = request.app.state.api_auth
    if not verifier.verify(request.headers.get("authorization")):
        raise Unauthorized()


async def require_admin_token(request: Request) -> None:
    """For `/admin/*`: closed (403) until EAS_ADMIN_TOKEN is set, then 401 without the right token."""
    verifier: TokenVerifier = request.app.state.admin_auth
    if not verifier.enabled:
        raise Forbidden("the admin API is closed: set EAS_ADMIN_TOKEN to enable it")
    if not verifier.verify(request.headers.get("authorization")):
        raise Unauthorized()


async def require_accepting(request: Request) -> None:
    (await get_service(request)).check_accepting()


async def check_content_length(request: Request) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return  # chunked: the middleware counts streamed bytes instead
    try:
        declared = int(raw)
    except ValueError:
        raise BadRequest("invalid Content-Length header") from None
    limit = (await get_settings(request)).max_body_bytes
    if declared > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")


async def inference_guards(request: Request) -> None:
    """The three checks in their order, as one dependency: FastAPI's cost is per dependency (about 0.1 ms
    each per request, measured in a profile of the parent process at 16 clients)."""
    await require_api_token(request)
    await require_accepting(request)
    await check_content_length(request)


# Attached to every inference route.
INFERENCE_GUARDS = [Depends(inference_guards)]
