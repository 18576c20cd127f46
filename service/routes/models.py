"""`GET /v1/models` (OpenAI model list, one id per served variant) and `GET /info` (what is served, how)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service.deps import ServiceDep, require_api_token
from service.lifecycle import Service
from service.runner.registry import ServedVariant

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_token)])


def default_first(service: Service) -> list[ServedVariant]:
    """Served variants, the default one first: OpenAI clients commonly take the first listed model, and
    that must be what a request without a variant gets (not whichever variant happened to load first)."""
    default = service.registry.default_variant
    return sorted(service.registry.all(), key=lambda s: s.variant != default)  # stable: others keep their order


@router.get("/v1/models")
async def list_models(service: ServiceDep) -> JSONResponse:
    default = service.registry.default_variant
    data = [{
        "id": s.variant,
        "object": "model",
        "created": service.started_unix,
        "owned_by": "eas-serve",
        "root": s.info.model,
        "parent": s.info.parent,
        "model": s.info.model,
        "version": s.info.version,
        "variant": s.variant,
        "kind": s.info.kind,
        "default": s.variant == default,
    } for s in default_first(service)]
    return JSONResponse({"object": "list", "data": data})


@router.get("/info")
async def info(service: ServiceDep) -> JSONResponse:
    s = service.settings
    variants: list[dict[str, Any]] = [{
        "variant": v.variant, "model": v.info.model, "version": v.info.version, "kind": v.info.kind,
        "parent": v.info.parent, "device": v.runner.device, "dtype": v.runner.dtype,
        "skipped_layers": list(v.runner.skipped_layers),
    } for v in default_first(service)]
    return JSONResponse({
        "phase": service.phase.value,
        "default_variant": service.registry.default_variant,
        "variants": variants,
        "batching": {"max_batch_size": s.max_batch_size, "max_batch_wait_ms": s.max_batch_wait_ms,
                     "max_queue_size": s.max_queue_size, "default_deadline_ms": s.default_deadline_ms,
                     "max_deadline_ms": s.max_deadline_ms},
        "limits": {"max_body_bytes": s.max_body_bytes, "max_image_pixels": s.max_image_pixels,
                   "max_image_side": s.max_image_side, "allowed_image_formats": s.allowed_image_formats,
                   "max_question_chars": s.max_question_chars, "max_new_tokens": s.max_new_tokens,
                   "default_max_new_tokens": s.default_max_new_tokens, "url_fetch": False},
    })

