"""OpenAI chat-completions requests → one image, one question and how to decode the answer.

The model answers a single question about a single image, so a conversation is reduced to: the one
`image_url` part found in the user messages (a `data:` URL; remote URLs are refused because fetching is
off) and the text of the last user message. System and assistant turns are accepted and ignored.

Every parameter of OpenAI's chat-completions API is either honoured or refused with a 422 naming it
(docs/serving.md, "OpenAI parameters"); a field OpenAI does not define is refused too. Honoured:
`temperature`, `top_p`, `seed`, `stop`, `max_tokens` / `max_completion_tokens`, `n` (1), `stream`,
`stream_options.include_usage`, plus `stop_token_ids` (vLLM's extension). Accepted because they never
change an answer: the caller identifiers `user`, `safety_identifier` and `prompt_cache_key`, and the
neutral value of a feature this server lacks (`logprobs: false`, `presence_penalty: 0`, `tools: []`,
`response_format: {"type": "text"}`, ...). Anything else a client asks for is a 422, never a silent 200.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from service.batching.work import Sampling
from service.errors import ValidationFailed
from service.settings import Settings
from service.validation.payloads import decode_image_field, offload_if_large, validate_max_new_tokens, validate_question
from service.validation.sampling import SamplingFields


class ImageURLPart(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's values; each image is processed one way here


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: ImageURLPart | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # only `false` (or absent): no padding is ever added


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # Caller identifiers (abuse monitoring, cache routing at OpenAI): they never change an answer.
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    # OpenAI parameters this server does not implement: typed loosely so that the check below, not a type
    # error, names them; only their neutral values pass (NEUTRAL).
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None


# Unimplemented parameter → (values that mean "not used", why it is refused otherwise).
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "frequency_penalty": ((0, 0.0), "repetition penalties are not implemented"),
    "presence_penalty": ((0, 0.0), "repetition penalties are not implemented"),
    "logit_bias": (({},), "logit_bias is not implemented"),
    "logprobs": ((False,), "log probabilities are not returned"),
    "top_logprobs": ((0,), "log probabilities are not returned"),
    "response_format": (({"type": "text"},), "only plain-text answers (response_format {'type': 'text'})"),
    "tools": (([],), "this model does not call tools"),
    "tool_choice": (("none",), "this model does not call tools"),
    "parallel_tool_calls": ((True, False), ""),  # a tool-use setting: with no tools it changes nothing
    "functions": (([],), "this model does not call functions"),
    "function_call": (("none",), "this model does not call functions"),
    "modalities": ((["text"],), "only text output"),
    "audio": ((), "no audio output"),
    "prediction": ((), "predicted outputs are not implemented"),
    "reasoning_effort": ((), "not a reasoning model"),
    "verbosity": ((), "answer length is set by max_tokens only"),
    "web_search_options": ((), "no web search"),
    "service_tier": (("auto", "default"), "one service tier only"),
    "store": ((False,), "completions are not stored"),
    "metadata": (({},), "metadata belongs to stored completions, which this server does not keep"),
    "moderation": ((), "no moderation"),
    "prompt_cache_options": ((), "no prompt cache"),
    "prompt_cache_retention": ((), "no prompt cache"),
}


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """422 naming the first parameter asked for that this server would otherwise have to ignore."""
    for name, (neutral, why) in NEUTRAL.items():
        value = getattr(body, name)
        if value is None or any(value == v and type(value) is type(v) for v in neutral):
            continue
        raise ValidationFailed(f"parameter {name!r} is not supported with value {value!r}: {why}",
                               param=name, code="unsupported_parameter")


@dataclass(frozen=True)
class ChatInput:
    image_bytes: bytes
    question: str
    max_new_tokens: int
    model: str | None
    stream: bool
    include_usage: bool
    sampling: Sampling


async def parse_chat(body: ChatCompletionRequest, settings: Settings) -> ChatInput:
    refuse_unsupported(body)
    if body.n not in (None, 1):
        raise ValidationFailed("only n=1 is supported (one answer per request)", param="n",
                               code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise ValidationFailed("stream_options is only allowed with stream: true", param="stream_options")
    if body.stream_options is not None and body.stream_options.include_obfuscation:
        raise ValidationFailed("stream_options.include_obfuscation is not supported",
                               param="stream_options.include_obfuscation", code="unsupported_parameter")
    images: list[str] = []
    question: Any = None
    for message in body.messages:
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            question = message.content
            continue
        texts = []
        for part in message.content or []:
            if part.type == "text":
                texts.append(part.text or "")
            elif part.type == "image_url":
                if part.image_url is None:
                    raise ValidationFailed("an image_url part needs an 'image_url': {'url': ...}",
                                           param="messages")
                images.append(part.image_url.url)
            else:
                raise ValidationFailed(f"content part type {part.type!r} is not supported (use 'text' and "
                                       "'image_url')", param="messages")
        question = "\n".join(t for t in texts if t.strip())
    if question is None:
        raise ValidationFailed("a user message with a question is required", param="messages")
    if len(images) != 1:
        raise ValidationFailed(f"exactly one image_url content part is required, got {len(images)}",
                               param="messages")
    question = validate_question(question, max_chars=settings.max_question_chars, param="messages",
                                 label="the question (the text of messages)")
    completion_limit = body.max_completion_tokens is not None
    limit = body.max_completion_tokens if completion_limit else body.max_tokens
    max_new_tokens = validate_max_new_tokens(
        limit, default=settings.default_max_new_tokens, cap=settings.max_new_tokens,
        param="max_completion_tokens" if completion_limit else "max_tokens")
    image_bytes = await offload_if_large(len(images[0]), partial(decode_image_field, param="messages"), images[0])
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatInput(image_bytes=image_bytes, question=question, max_new_tokens=max_new_tokens,
                     model=body.model, stream=bool(body.stream), include_usage=include_usage,
                     sampling=body.sampling())
