"""Prompts for image + question, built from the processor's own chat template."""

from __future__ import annotations

import contextlib
import re
import weakref
from typing import Any

from transformers import ProcessorMixin


def build_prompt(processor: ProcessorMixin, question: str) -> str:
    """One image followed by the question, in the model's chat format, ready for generation."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", "<image>")
    return f"{image_token}{question}"


def reserved_markers(processor: ProcessorMixin) -> dict[str, str]:
    """The processor's own marker strings by attribute name: `image_token`, `video_token`, `boi_token`,
    `vision_start_token`, ... (every `*_token` attribute holding a string). The processor counts, expands or
    interprets these wherever they appear in a prompt's text, so a question is plain text only without them
    (docs/serving.md, "Errors")."""
    return {name: value for name, value in vars(processor).items()
            if name.endswith("_token") and isinstance(value, str) and value}


def special_tokens(processor: ProcessorMixin) -> list[str]:
    """The tokenizer's special tokens (BOS, EOS, padding, and the added ones marked special: image soft
    tokens, vision start/end, chat-turn markers): strings the tokenizer maps to control ids, not text."""
    tokenizer = getattr(processor, "tokenizer", processor)
    found = set(getattr(tokenizer, "all_special_tokens", []))
    found.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return sorted(t for t in found if t)


def find_marker(processor: ProcessorMixin, text: str) -> tuple[str, str] | None:
    """(what it is, marker) of the first reserved string in `text`: one of the processor's markers
    (`reserved_markers`, named by its attribute) or one of the tokenizer's special tokens; None when the
    text is plain."""
    names, pattern = _reserved(processor)
    match = pattern.search(text) if pattern is not None else None
    return None if match is None else (names[match.group(0)], match.group(0))


_RESERVED: weakref.WeakKeyDictionary[Any, tuple[dict[str, str], re.Pattern[str] | None]] = weakref.WeakKeyDictionary()


def _reserved(processor: ProcessorMixin) -> tuple[dict[str, str], re.Pattern[str] | None]:
    """Every reserved string with what it is, and one pattern that finds any of them (longest first), built
    once per processor: a request is checked in one pass, whatever the number of special tokens."""
    try:
        return _RESERVED[processor]
    except (KeyError, TypeError):
        pass
    names = {token: "a special token of this model's tokenizer" for token in special_tokens(processor)}
    names.update({marker: f"this model's {name.replace('_', ' ')}" for name, marker in
                  reserved_markers(processor).items()})
    alternatives = sorted(names, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
    with contextlib.suppress(TypeError):  # a processor that takes no weak reference is rebuilt each time
        _RESERVED[processor] = (names, pattern)
    return names, pattern
