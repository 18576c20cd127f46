"""Probes: `/health/live` (the event loop answers; never touches the model) and `/health/ready`
(`/health` alias): 200 only when every variant is loaded, warmed up and the service is not draining."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.deps import ServiceDep
from service.errors import ServiceUnavailable, error_response

router = APIRouter(tags=["health"])


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    default_variant: str | None
    variants: list[str]


# HEAD too: some load balancers and uptime checkers probe with it (405 before).
@router.api_route("/health/live", methods=["GET", "HEAD"])
async def live() -> Liveness:
    return Liveness()


# Not ready is answered with the error shape returned, not raised (raising would count the probe as a
# rejected request); so the annotation includes JSONResponse and the response model is named here.
@router.api_route("/health/ready", methods=["GET", "HEAD"], response_model=Readiness)
@router.api_route("/health", methods=["GET", "HEAD"], response_model=Readiness)
async def ready(request: Request, service: ServiceDep) -> Readiness | JSONResponse:
    try:
        service.check_accepting()
    except ServiceUnavailable as exc:  # the common error shape, naming the phase; not a "rejection"
        return error_response(request, exc, count=False)
    return Readiness(default_variant=service.registry.default_variant,
                     variants=[s.variant for s in service.registry.all()])
