"""`POST /v1/answer`: the native route (multipart upload or JSON with a base64 image)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from service.deps import INFERENCE_GUARDS, ServiceDep
from service.inference import infer
from service.openapi import standalone_schema
from service.validation.requests import AnswerForm, AnswerJSON, read_answer_request

router = APIRouter(tags=["inference"], dependencies=INFERENCE_GUARDS)


class Timings(BaseModel):
    queue_s: float
    preprocess_s: float
    inference_s: float
    total_s: float


class AnswerResponse(BaseModel):
    answer: str
    model: str
    version: str
    variant: str
    request_id: str
    timings: Timings


# One body, two content types: FastAPI documents one per route, so both schemas go in through
# openapi_extra, each generated from the model that states its rules.
_REQUEST_BODY = {
    "content": {
        "multipart/form-data": {"schema": standalone_schema(AnswerForm)},
        "application/json": {"schema": standalone_schema(AnswerJSON)},
    },
    "required": True,
}


@router.post("/v1/answer", openapi_extra={"requestBody": _REQUEST_BODY})
async def answer(
    request: Request,
    response: Response,
    service: ServiceDep,
) -> AnswerResponse:
    settings, metrics = service.settings, service.metrics  # one dependency, not three (deps.py)
    parsed = await read_answer_request(request, settings)
    # Looked up right before admission (no await in between) and held for the whole request, so a hot
    # swap of this variant cannot strand it: it completes on the runner it was admitted to.
    served = service.registry.get(parsed.variant)
    outcome = await infer(request, served, image_bytes=parsed.image_bytes, question=parsed.question,
                          max_new_tokens=parsed.max_new_tokens, deadline=parsed.deadline,
                          limits=service.image_limits, metrics=metrics, sampling=parsed.sampling)
    info = served.info
    response.headers.update(outcome.headers())
    return AnswerResponse(answer=outcome.generation.text, model=info.model, version=info.version,
                          variant=info.variant, request_id=request.state.request_id,
                          timings=Timings(**outcome.timings()))
