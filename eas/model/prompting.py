"""Prompts for image + question, built from the processor's own chat template."""

from __future__ import annotations

import contextlib
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
    return sorted(t for t in tokenizer.convert_ids_to_tokens(sorted(_special_ids(tokenizer))) if t)


def find_marker(processor: ProcessorMixin, text: str) -> tuple[str, str] | None:
    """(what it is, marker) of the first reserved string in `text`, or None when the text is plain: one of
    the processor's markers (`reserved_markers`, which the processor finds by substring), else a special
    token the tokenizer would make of the text (matched by the tokenizer itself, in one linear pass: a pattern
    of thousands of alternatives, as some tokenizers have, costs milliseconds on text like '<<<<...')."""
    for name, marker in reserved_markers(processor).items():
        if marker in text:
            return f"this model's {name.replace('_', ' ')}", marker
    tokenizer = getattr(processor, "tokenizer", processor)
    special = _special_ids(tokenizer)
    if not special or not callable(tokenizer):
        return None
    # A fast tokenizer's own Rust tokenizer: what its __call__ runs, without ~50 µs of Python around it, as
    # long as no truncation or padding is configured on it (__call__ would switch those off for the call).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for token_id in ids:
        if token_id in special:
            return "a special token of this model's tokenizer", tokenizer.convert_ids_to_tokens(token_id)
    return None


_SPECIAL_IDS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's special tokens (`special_tokens`), computed once per tokenizer."""
    try:
        return _SPECIAL_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = set(getattr(tokenizer, "all_special_ids", []))
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    # Not the unknown token: a tokenizer without byte fallback makes it of any character outside its
    # vocabulary ("?", "é", an emoji), and it marks no structure; counted, such questions were refused.
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    found = frozenset(ids)
    with contextlib.suppress(TypeError):  # a tokenizer that takes no weak reference is read each time
        _SPECIAL_IDS[tokenizer] = found
    return found
