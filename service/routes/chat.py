"""`POST /v1/chat/completions`: OpenAI-compatible, so the official clients work unchanged.

Streaming (`stream: true`) is served as Server-Sent Events in OpenAI's chunk format. Generation is not
incremental behind `LoadedModel`, so the answer arrives as one content chunk once the batch finishes;
errors found before that are ordinary JSON errors with a status code.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.deps import INFERENCE_GUARDS, MetricsDep, ServiceDep, SettingsDep
from service.errors import UnsupportedMediaType
from service.inference import Outcome, infer
from service.openapi import standalone_schema
from service.validation.chat import ChatCompletionRequest, parse_chat
from service.validation.requests import is_json, media_type, read_json, request_deadline, validate_model

router = APIRouter(tags=["openai"], dependencies=INFERENCE_GUARDS)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None  # never computed; present because OpenAI's clients expect the key
    finish_reason: Literal["stop", "length"]  # end of sequence, or max_tokens reached


class Usage(BaseModel):
    prompt_tokens: int  # image tokens included
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


_REQUEST_BODY = {"content": {"application/json": {"schema": standalone_schema(ChatCompletionRequest)}},
                 "required": True}
# The JSON body's schema comes from response_model; the stream's events are not one JSON document.
_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "A chat completion; with `stream: true`, Server-Sent Events of completion chunks.",
    "content": {"text/event-stream": {}}}}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_RESPONSES,
             openapi_extra={"requestBody": _REQUEST_BODY})
async def chat_completions(
    request: Request,
    response: Response,
    service: ServiceDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> ChatCompletion | StreamingResponse:
    if not is_json(media_type(request)):
        raise UnsupportedMediaType("Content-Type must be application/json")
    body: ChatCompletionRequest = validate_model(ChatCompletionRequest, await read_json(request))
    parsed = await parse_chat(body, settings)
    # Looked up right before admission (no await in between), so a hot swap cannot strand the request.
    served = service.registry.resolve_model_id(parsed.model)
    outcome = await infer(request, served, image_bytes=parsed.image_bytes, question=parsed.question,
                          max_new_tokens=parsed.max_new_tokens, deadline=request_deadline(request, settings),
                          limits=service.image_limits, metrics=metrics)
    completion_id = f"chatcmpl-{request.state.request_id}"
    model_id = body.model or served.variant
    created = int(time.time())
    if parsed.stream:
        chunks = _stream(outcome, completion_id, model_id, created, parsed.include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={**outcome.headers(), "cache-control": "no-cache"})
    generation = outcome.generation
    response.headers.update(outcome.headers())
    return ChatCompletion(
        id=completion_id, created=created, model=model_id, system_fingerprint=_fingerprint(outcome),
        choices=[ChatChoice(index=0, message=AssistantMessage(content=generation.text),
                            finish_reason=generation.finish_reason)],
        usage=_usage(outcome),
    )


def _usage(outcome: Outcome) -> Usage:
    g = outcome.generation
    return Usage(prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                 total_tokens=g.prompt_tokens + g.completion_tokens)


def _fingerprint(outcome: Outcome) -> str:
    info = outcome.served.info
    return f"{info.model}:{info.version}:{info.variant}"


async def _stream(
    outcome: Outcome, completion_id: str, model_id: str, created: int, include_usage: bool
) -> AsyncIterator[bytes]:
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "system_fingerprint": _fingerprint(outcome)}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode()

    generation = outcome.generation
    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    yield event([{"index": 0, "delta": {"content": generation.text}, "finish_reason": None}])
    yield event([{"index": 0, "delta": {}, "finish_reason": generation.finish_reason}])
    if include_usage:
        yield event([], usage=_usage(outcome).model_dump())
    yield b"data: [DONE]\n\n"
