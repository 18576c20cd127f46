"""OpenAI chat-completions requests → one image and one question.

The model answers a single question about a single image, so a conversation is reduced to: the one
`image_url` part found in the user messages (a `data:` URL; remote URLs are refused because fetching is
off) and the text of the last user message. System and assistant turns are accepted and ignored.
Sampling parameters are accepted and ignored too: decoding is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.errors import ValidationFailed
from service.settings import Settings
from service.validation.payloads import decode_image_field, offload_if_large, validate_max_new_tokens, validate_question


class ImageURLPart(BaseModel):
    url: str
    detail: str | None = None  # ignored


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
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


@dataclass(frozen=True)
class ChatInput:
    image_bytes: bytes
    question: str
    max_new_tokens: int
    model: str | None
    stream: bool
    include_usage: bool


async def parse_chat(body: ChatCompletionRequest, settings: Settings) -> ChatInput:
    if body.n not in (None, 1):
        raise ValidationFailed("only n=1 is supported (decoding is greedy)", param="n")
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
    question = validate_question(question, max_chars=settings.max_question_chars, param="messages")
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_new_tokens = validate_max_new_tokens(limit, default=settings.default_max_new_tokens,
                                             cap=settings.max_new_tokens, param="max_tokens")
    image_bytes = await offload_if_large(len(images[0]), partial(decode_image_field, param="messages"), images[0])
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatInput(image_bytes=image_bytes, question=question, max_new_tokens=max_new_tokens,
                     model=body.model, stream=body.stream, include_usage=include_usage)
