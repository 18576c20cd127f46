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
