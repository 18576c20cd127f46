"""`GET /v1/models` (OpenAI model list, one id per served variant) and `GET /info` (what is served, how)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from eas.model.token_reduction import reduction_info
from service.deps import ServiceDep, require_api_token
from service.lifecycle import Service
from service.runner.registry import ServedVariant

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_token)])


class ModelCard(BaseModel):
    """One served variant, as an OpenAI model object plus what this server knows about it."""

    id: str  # the variant: what a chat request's `model` names
    object: Literal["model"] = "model"
    created: int  # when this server started
    owned_by: str = "eas-serve"
    root: str
    parent: str | None
    model: str
    version: str
    variant: str
    kind: str
    default: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VariantView(BaseModel):
    variant: str
    model: str
    version: str
    kind: str
    parent: str | None
    device: str
    dtype: str
    skipped_layers: list[int]
    # issue 19: the visual-token budget (criterion, keep_fraction/keep_count, last prompt's tokens before and
    # after); null when every image token is kept
    token_reduction: dict[str, object] | None = None


class BatchingView(BaseModel):
    max_batch_size: int
    max_batch_wait_ms: float
    max_queue_size: int
    default_deadline_ms: int
    max_deadline_ms: int


class LimitsView(BaseModel):
    max_body_bytes: int
    max_image_pixels: int
    max_image_side: int
    allowed_image_formats: list[str]
    max_question_chars: int
    max_new_tokens: int
    default_max_new_tokens: int
    url_fetch: bool


class Info(BaseModel):
    phase: str
    default_variant: str | None  # None while nothing is loaded
    variants: list[VariantView]
    batching: BatchingView
    limits: LimitsView


def default_first(service: Service) -> list[ServedVariant]:
    """Served variants, the default one first: OpenAI clients commonly take the first listed model, and
    that must be what a request without a variant gets (not whichever variant happened to load first)."""
    default = service.registry.default_variant
    return sorted(service.registry.all(), key=lambda s: s.variant != default)  # stable: others keep their order


@router.get("/v1/models")
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(data=[_card(service, s) for s in default_first(service)])


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, service: ServiceDep) -> ModelCard:
    """One served variant by any name a chat request's `model` accepts (404 naming the served ones)."""
    s = service.registry.resolve_model_id(model_id)
    return _card(service, s)


def _card(service: Service, s: ServedVariant) -> ModelCard:
    return ModelCard(id=s.variant, created=service.started_unix, root=s.info.model, parent=s.info.parent,
                     model=s.info.model, version=s.info.version, variant=s.variant, kind=s.info.kind,
                     default=s.variant == service.registry.default_variant)


@router.get("/info")
async def info(service: ServiceDep) -> Info:
    s = service.settings
    return Info(
        phase=service.phase.value,
        default_variant=service.registry.default_variant,
        variants=[VariantView(
            variant=v.variant, model=v.info.model, version=v.info.version, kind=v.info.kind, parent=v.info.parent,
            device=v.runner.device, dtype=v.runner.dtype, skipped_layers=list(v.runner.skipped_layers),
            token_reduction=reduction_info(v.runner.model.model),
        ) for v in default_first(service)],
        batching=BatchingView(max_batch_size=s.max_batch_size, max_batch_wait_ms=s.max_batch_wait_ms,
                              max_queue_size=s.max_queue_size, default_deadline_ms=s.default_deadline_ms,
                              max_deadline_ms=s.max_deadline_ms),
        limits=LimitsView(max_body_bytes=s.max_body_bytes, max_image_pixels=s.max_image_pixels,
                          max_image_side=s.max_image_side, allowed_image_formats=s.allowed_image_formats,
                          max_question_chars=s.max_question_chars, max_new_tokens=s.max_new_tokens,
                          default_max_new_tokens=s.default_max_new_tokens, url_fetch=False),
    )
