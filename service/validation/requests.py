"""Parse the two inference request formats into one validated `InferenceInput`.

Checks run in the conventions' order: content type (415) → body parse (400) → schema and semantics
(422). Admission (429) and image decoding come after, in `service.inference`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from pydantic.json_schema import SkipJsonSchema
from starlette.datastructures import UploadFile

from service.batching.work import GREEDY, Sampling
from service.errors import BadRequest, UnsupportedMediaType, ValidationFailed, describe_validation
from service.settings import Settings
from service.validation.payloads import (
    DEADLINE_HEADER,
    deadline_from_header,
    decode_image_field,
    offload_if_large,
    validate_max_new_tokens,
    validate_question,
)
from service.validation.sampling import SEED_BOUND, SamplingFields, sampling_from_form


@dataclass(frozen=True)
class InferenceInput:
    image_bytes: bytes
    question: str
    max_new_tokens: int
    variant: str | None
    deadline: float  # time.monotonic()
    sampling: Sampling = GREEDY  # temperature, top_p, seed, stop (service/validation/sampling.py)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _too_many_values(max_values: int) -> BadRequest:
    return BadRequest(f"the JSON body holds more than {max_values} values; requests are far smaller",
                      code="json_too_complex")


def _precheck_json_size(body: bytes, max_values: int) -> None:
    """An upper bound on the values of a JSON text before it is parsed (issue 17, H2): every value is the
    root, follows a comma or is the first in a container (commas inside strings only raise the bound).
    json.loads holds the GIL for the whole parse, a third of a second for a 14 MB body of 400,000 messages,
    even in a worker thread, so such a body is refused from this count (a few milliseconds) instead, and
    schema validation never walks more values than this. A base64 image has no commas."""
    if body.count(b",") + body.count(b"[") + body.count(b"{") > max_values:
        raise _too_many_values(max_values)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def parse_json(body: bytes) -> Any:
    """json.loads as RFC 8259 has it: `NaN` and `Infinity` are not JSON, and a number too large for a float
    (1e999, which Python reads as inf) is refused rather than passed on as infinity (an infinite learning
    rate reached the job store as a 500)."""
    return json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)


async def read_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise BadRequest("the request body is empty")
    max_values = request.app.state.settings.max_json_values
    _precheck_json_size(body, max_values)
    try:
        # Parsing and counting values scale with the body: large bodies go to a worker thread.
        return await offload_if_large(len(body), parse_json, body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from exc
    except RecursionError:
        # json.loads recurses per nesting level: a few KB of "[[[[..." would otherwise be a 500.
        raise BadRequest("malformed JSON body: nested too deeply") from None


def request_deadline(request: Request, settings: Settings) -> float:
    return deadline_from_header(request.headers.get(DEADLINE_HEADER), started_at=request.state.started_at,
                                default_ms=settings.default_deadline_ms, max_ms=settings.max_deadline_ms)


def validate_model(model: type[BaseModel], payload: Any) -> Any:
    """Pydantic validation with the service's 422 (first problems named, `param` set)."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        message, param = describe_validation(list(exc.errors()))
        raise ValidationFailed(message, param=param) from None


class ImageURL(BaseModel):
    url: str


class AnswerJSON(SamplingFields):
    """`POST /v1/answer` with `Content-Type: application/json`."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="Base64 image bytes or a data: URL.")
    image_url: str | ImageURL | None = Field(None, description="Alternative to `image`: a data: URL.")
    # The schema states what the handler checks (its own messages, so json_schema_extra, not constraints).
    question: str = Field(json_schema_extra={"pattern": r"\S"})
    variant: str | None = Field(None, description="`eas`, `baseline` or `auto` (default variant).")
    # Strict: JSON `true` is not the integer 1, nor "8" the number 8 (issue 17).
    max_new_tokens: StrictInt | None = Field(None, json_schema_extra={"minimum": 1})


# The form is read by `_read_multipart` (with its own messages and `param`s); this model states the same
# rules in the OpenAPI document, so schema-driven clients and fuzzers do not send forms the document calls
# valid only to get a 4xx. A form field is sent or left out, never null: optional fields are documented
# without a null choice (SkipJsonSchema; FastAPI leaves the null defaults out of the document).
class AnswerForm(BaseModel):
    """`POST /v1/answer` as `multipart/form-data`: an image file and a question about it."""

    model_config = ConfigDict(extra="forbid")

    image: bytes = Field(description="The image file.")
    question: str = Field(json_schema_extra={"pattern": r"\S"})
    variant: Literal["eas", "baseline", "auto"] | SkipJsonSchema[None] = None
    max_new_tokens: int | SkipJsonSchema[None] = Field(None, json_schema_extra={"minimum": 1})
    temperature: float | SkipJsonSchema[None] = Field(None, ge=0, le=2)
    top_p: float | SkipJsonSchema[None] = Field(None, gt=0, le=1)
    seed: int | SkipJsonSchema[None] = Field(None, ge=-SEED_BOUND, le=SEED_BOUND)
    stop: list[str] | SkipJsonSchema[None] = Field(None, max_length=4, description="Repeat the field for several.")
    stop_token_ids: list[int] | SkipJsonSchema[None] = None


async def read_answer_request(request: Request, settings: Settings) -> InferenceInput:
    media = media_type(request)
    if media == "multipart/form-data":
        fields = await _read_multipart(request, settings)
    elif is_json(media):
        fields = await _read_answer_json(request)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {media or '(none)'!r} is not accepted; use multipart/form-data "
            "(image file + question) or application/json (base64 image + question)")
    image_bytes, question, max_new_tokens, variant, sampling = fields
    return InferenceInput(
        image_bytes=image_bytes,
        question=validate_question(question, max_chars=settings.max_question_chars),
        max_new_tokens=validate_max_new_tokens(max_new_tokens, default=settings.default_max_new_tokens,
                                               cap=settings.max_new_tokens),
        variant=variant or None,
        deadline=request_deadline(request, settings),
        sampling=sampling,
    )


async def _check_multipart_complete(request: Request) -> None:
    """A body without its closing boundary is truncated: Starlette's parser would quietly drop its last
    part (issue 17). The body is read here (bounded by the middleware) and parsed from that copy."""
    boundary = request.headers.get("content-type", "").partition("boundary=")[2].split(";", 1)[0].strip().strip('"')
    body = await request.body()
    delimiter = f"--{boundary}".encode("latin-1", "replace")
    # Only a body that is framed by this boundary can be called truncated; other framing errors are
    # Starlette's to name.
    framed = bool(boundary) and body.lstrip(b"\r\n").startswith(delimiter)
    if framed and not body.rstrip(b"\r\n \t").endswith(delimiter + b"--"):
        raise BadRequest("the multipart body is truncated: it does not end with its closing boundary",
                         code="truncated_body")


# The multipart form's fields: as strict as the JSON body (extra fields forbidden), and a field that takes
# one value given twice is ambiguous, not "the last one wins".
FORM_FIELDS = frozenset(AnswerForm.model_fields)  # the documented form is the accepted one
REPEATABLE_FORM_FIELDS = frozenset({"stop", "stop_token_ids"})


def _check_form_fields(keys: list[str]) -> None:
    for key in keys:
        if key not in FORM_FIELDS:
            raise ValidationFailed(f"unknown multipart field {key[:64]!r} (fields: {', '.join(sorted(FORM_FIELDS))})",
                                   param=key[:64])
        if key not in REPEATABLE_FORM_FIELDS and keys.count(key) > 1:
            raise ValidationFailed(f"multipart field {key!r} appears {keys.count(key)} times; it takes one value",
                                   param=key)


async def _read_multipart(request: Request, settings: Settings) -> tuple[bytes, Any, Any, str | None, Sampling]:
    # One file and a handful of short fields: anything more is a malformed request (400 from Starlette).
    await _check_multipart_complete(request)
    async with request.form(max_files=1, max_fields=16, max_part_size=settings.max_question_chars * 4 + 1024) as form:
        _check_form_fields([key for key, _ in form.multi_items()])
        image = form.get("image")
        if image is None:
            raise ValidationFailed("multipart field 'image' (an image file) is required", param="image")
        if not isinstance(image, UploadFile):
            raise ValidationFailed("multipart field 'image' must be a file upload, not a text field",
                                   param="image")
        data = await image.read()
        question = form.get("question")
        if question is None:
            raise ValidationFailed("multipart field 'question' is required", param="question")
        variant = form.get("variant")
        if variant is not None and not isinstance(variant, str):
            raise ValidationFailed("multipart field 'variant' must be text", param="variant")
        sampling = sampling_from_form({"temperature": form.get("temperature"), "top_p": form.get("top_p"),
                                       "seed": form.get("seed"), "stop": form.getlist("stop"),
                                       "stop_token_ids": form.getlist("stop_token_ids")})
        return data, question, form.get("max_new_tokens"), variant, sampling


async def _read_answer_json(request: Request) -> tuple[bytes, Any, Any, str | None, Sampling]:
    body: AnswerJSON = validate_model(AnswerJSON, await read_json(request))
    source = body.image if body.image is not None else body.image_url
    if isinstance(source, ImageURL):
        source = source.url
    if source is None:
        raise ValidationFailed("'image' (base64 or a data: URL) is required", param="image")
    if body.image is not None and body.image_url is not None:
        raise ValidationFailed("give either 'image' or 'image_url', not both", param="image")
    data = await offload_if_large(len(source), decode_image_field, source)
    return data, body.question, body.max_new_tokens, body.variant, body.sampling()
