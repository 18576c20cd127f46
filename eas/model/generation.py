"""Greedy generation that is exact for EAS models.

For a converted model the prompt mask is set explicitly (so p, w and folded biases pool over the
prompt only and stay frozen while decoding) and the KV cache has a DummyLayer in every skipped slot.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, PreTrainedModel

from eas.model.cache import make_cache
from eas.model.convert import eas_runtime
from eas.model.pooling import prompt_context


def generate(model: PreTrainedModel, batch: BatchFeature | dict, max_new_tokens: int = 8,
             plan: object | None = None, **kwargs: object) -> torch.Tensor:
    """Greedy ids (prompt included), like `model.generate`. `plan` is accepted for symmetry; the
    model's own recorded plan is authoritative."""
    kwargs.setdefault("do_sample", False)
    runtime = eas_runtime(model)
    if runtime is None:
        return model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    if kwargs.get("use_cache", True):
        kwargs.setdefault("past_key_values", make_cache(model, runtime.plan.skipped))
    with prompt_context(runtime.state, mask):
        return model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
