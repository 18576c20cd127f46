"""Field-level checks shared by the native and the OpenAI-compatible routes.

Every failure names the field (`param`) and the problem, so a client can fix its request without reading
server logs.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Callable
from typing import TypeVar

import anyio

from service.errors import BadRequest, UnsupportedMediaType, ValidationFailed

DEADLINE_HEADER = "x-request-deadline-ms"
# Below this size, parsing on the event loop is cheaper than a hop to a worker thread (~50-100 µs);
# above it, parsing could stall other requests for milliseconds.
OFFLOAD_BYTES = 256 * 1024

T = TypeVar("T")


async def offload_if_large(size: int, fn: Callable[..., T], *args: object) -> T:
    """Run CPU-bound parsing inline when small, in a worker thread when it could block the loop."""
    if size < OFFLOAD_BYTES:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)


def decode_image_field(value: str, *, param: str = "image") -> bytes:
    """Bytes of an image given as a `data:` URL or bare base64. Remote URLs are refused: fetching is off."""
    text = value.strip()
    lowered = text[:8].lower()
    if lowered.startswith(("http://", "https://")):
        raise BadRequest(
            "image URLs are not fetched (URL fetching is disabled on this server); "
            "send the image inline as a data: URL (data:image/png;base64,...)",
            code="image_url_fetch_disabled", param=param,
        )
    if lowered.startswith("data:"):
        header, comma, payload = text[5:].partition(",")
        if not comma:
            raise BadRequest("malformed data URL: no ',' after the media type", param=param)
        media_type, _, encoding = header.rpartition(";")
        if encoding.lower() != "base64":
            raise BadRequest("data URLs must be base64-encoded (data:image/png;base64,...)", param=param)
        media_type = media_type.split(";", 1)[0].strip().lower()
        if media_type and not media_type.startswith("image/"):
            raise UnsupportedMediaType(f"data URL media type {media_type!r} is not an image", param=param)
        text = payload
    elif ":" in text[:16]:
        scheme = text.split(":", 1)[0]
        raise BadRequest(f"unsupported image URL scheme {scheme!r}; send a data: URL or base64", param=param)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"invalid base64 in {param}: {exc}", param=param) from exc


def validate_question(question: object, *, max_chars: int, param: str = "question", label: str | None = None) -> str:
    """`label` names the text in messages when it is not the parameter itself (the chat route's question is
    the text of its messages)."""
    name = label or param
    if not isinstance(question, str):
        raise ValidationFailed(f"{name} must be a string", param=param)
    question = question.strip()
    if not question:
        raise ValidationFailed(f"{name} must not be empty", param=param)
    if len(question) > max_chars:
        raise ValidationFailed(f"{name} has {len(question)} characters; the limit is {max_chars}", param=param)
    _check_plain_text(question, param)  # first: a NUL is named as such, not as "invisible"
    if not any(_visible(char) for char in question):
        raise ValidationFailed(f"{name} has no visible characters (only spaces, joiners or format marks)",
                               param=param)
    return question


_DECIMAL = re.compile(r"-?[0-9]+")
# Separators, format characters (zero-width space/joiner, BOM, bidi marks) and combining marks alone.
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cf", "Mn", "Me", "Cc"})


def _visible(char: str) -> bool:
    return unicodedata.category(char) not in _INVISIBLE_CATEGORIES and char not in "\u115f\u1160\u3164\uffa0"


# C0 controls but tab/LF/CR, DEL and C1 controls (Unicode category Cc), and UTF-16 surrogates (Cs).
_NOT_PLAIN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _check_plain_text(text: str, param: str) -> None:
    """Refuse text a tokenizer cannot take or that is binary, before it reaches a batch.

    A lone surrogate (JSON allows `"\\ud800"`) makes the Rust tokenizer raise inside the worker, which
    fails every request of that batch with 500; control characters (NUL, C1) only come from binary
    payloads or text decoded with the wrong charset, never from a question someone typed.
    """
    found = _NOT_PLAIN_TEXT.search(text)
    if found is None:
        return
    char, position = found.group(), found.start()
    if "\ud800" <= char <= "\udfff":
        raise ValidationFailed(f"{param} contains a lone UTF-16 surrogate (U+{ord(char):04X}) at character "
                               f"{position}: it is not valid Unicode text", param=param)
    raise ValidationFailed(f"{param} contains the control character U+{ord(char):04X} at character {position}; "
                           "send plain UTF-8 text", param=param)


def validate_max_new_tokens(value: object, *, default: int, cap: int, param: str = "max_new_tokens") -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise ValidationFailed(f"{param} must be an integer", param=param)
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value.strip()):  # int() would also take "5_0" and " +8 "
            raise ValidationFailed(f"{param} must be an integer", param=param)
        value = int(value.strip())
    if not isinstance(value, int):
        raise ValidationFailed(f"{param} must be an integer", param=param)
    if not 1 <= value <= cap:
        raise ValidationFailed(f"{param} must be between 1 and {cap}, got {value}", param=param)
    return value


def deadline_from_header(
    raw: str | None, *, started_at: float, default_ms: int, max_ms: int
) -> float:
    """Absolute `time.monotonic()` deadline: the request's start plus its budget, clamped to `max_ms`."""
    budget_ms = default_ms
    if raw is not None:
        if not _DECIMAL.fullmatch(raw.strip()):
            raise ValidationFailed("X-Request-Deadline-Ms must be an integer number of milliseconds",
                                   param="X-Request-Deadline-Ms")
        budget_ms = int(raw.strip())
        if budget_ms <= 0:
            raise ValidationFailed("X-Request-Deadline-Ms must be positive", param="X-Request-Deadline-Ms")
        budget_ms = min(budget_ms, max_ms)
    return started_at + budget_ms / 1000.0
