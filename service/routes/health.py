"""Probes: `/health/live` (the event loop answers; never touches the model) and `/health/ready`
(`/health` alias): 200 only when every variant is loaded, warmed up and the service is not draining."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.deps import ServiceDep
from service.errors import ServiceUnavailable, error_response

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> JSONResponse:
    return JSONResponse({"status": "alive"})


@router.get("/health/ready")
@router.get("/health")
async def ready(request: Request, service: ServiceDep) -> JSONResponse:
    try:
        service.check_accepting()
    except ServiceUnavailable as exc:  # the common error shape, naming the phase; not a "rejection"
        return error_response(request, exc, count=False)
    return JSONResponse({"status": "ready", "default_variant": service.registry.default_variant,
                         "variants": [s.variant for s in service.registry.all()]})
