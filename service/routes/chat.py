"""`POST /v1/chat/completions`: OpenAI-compatible, so the official clients work unchanged.

Streaming (`stream: true`) is served as Server-Sent Events in OpenAI's chunk format, one content chunk
per step that makes new text final (service/streaming.py); the first leaves as soon as the first token
exists. Errors found before the first token are ordinary JSON errors with a status code; a failure after
it ends the stream with an `error` event.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.batching.work import TokenSink
from service.deps import INFERENCE_GUARDS, ServiceDep
from service.errors import ServiceError, UnsupportedMediaType
from service.inference import Outcome, infer
from service.openapi import standalone_schema
from service.runner.runner import VariantInfo
from service.streaming import TokenStream, open_stream
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
) -> ChatCompletion | StreamingResponse:
    settings, metrics = service.settings, service.metrics  # one dependency, not three (deps.py)
    if not is_json(media_type(request)):
        raise UnsupportedMediaType("Content-Type must be application/json")
    body: ChatCompletionRequest = validate_model(ChatCompletionRequest, await read_json(request))
    parsed = await parse_chat(body, settings)
    # Looked up right before admission (no await in between), so a hot swap cannot strand the request.
    served = service.registry.resolve_model_id(parsed.model)

    def run(sink: TokenSink | None = None) -> Any:
        return infer(request, served, image_bytes=parsed.image_bytes, question=parsed.question,
                     max_new_tokens=parsed.max_new_tokens, deadline=request_deadline(request, settings),
                     limits=service.image_limits, metrics=metrics, sampling=parsed.sampling, sink=sink)

    completion_id = f"chatcmpl-{request.state.request_id}"
    model_id = body.model or served.variant
    created = int(time.time())
    if parsed.stream:
        stream = await open_stream(run)
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "system_fingerprint": _fingerprint(served.info)}
        return StreamingResponse(_stream(stream, base, parsed.include_usage), media_type="text/event-stream",
                                 headers={"x-model-variant": served.variant, "cache-control": "no-cache"})
    outcome = await run()
    generation = outcome.generation
    response.headers.update(outcome.headers())
    return ChatCompletion(
        id=completion_id, created=created, model=model_id, system_fingerprint=_fingerprint(served.info),
        choices=[ChatChoice(index=0, message=AssistantMessage(content=generation.text),
                            finish_reason=_finish_reason(generation.finish_reason))],
        usage=_usage(outcome),
    )


def _usage(outcome: Outcome) -> Usage:
    g = outcome.generation
    return Usage(prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                 total_tokens=g.prompt_tokens + g.completion_tokens)


def _finish_reason(reason: str) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"  # "cancelled" never reaches a client


def _fingerprint(info: VariantInfo) -> str:
    return f"{info.model}:{info.version}:{info.variant}"


async def _stream(stream: TokenStream, base: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode()

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    async for delta in stream.deltas():
        yield event([{"index": 0, "delta": {"content": delta}, "finish_reason": None}])
    try:
        outcome = stream.outcome()
    except ServiceError as exc:  # after the first token: the status line has been sent already
        body = {"error": {"message": str(exc), "type": exc.type, "code": exc.code, "param": exc.param}}
        yield f"data: {json.dumps(body)}\n\n".encode()
        return
    yield event([{"index": 0, "delta": {}, "finish_reason": _finish_reason(outcome.generation.finish_reason)}])
    if include_usage:
        yield event([], usage=_usage(outcome).model_dump())
    yield b"data: [DONE]\n\n"
