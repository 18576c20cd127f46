"""Greedy generation that is correct for EAS models (filled in by the core: pooling + KV layout)."""

from __future__ import annotations

import torch
from transformers import BatchFeature, PreTrainedModel


def generate(model: PreTrainedModel, batch: BatchFeature, max_new_tokens: int = 8, plan=None) -> torch.Tensor:
    return model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
