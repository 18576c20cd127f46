"""Prompts for image + question, built from the processor's own chat template."""

from __future__ import annotations

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


def find_marker(processor: ProcessorMixin, text: str) -> tuple[str, str] | None:
    """(attribute name, marker) of the first reserved marker in `text`, or None."""
    return next(((name, marker) for name, marker in reserved_markers(processor).items() if marker in text), None)
