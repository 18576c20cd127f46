"""The optimiser and learning-rate schedule both stages of the demo recipe use."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable `params`: weight decay on matrices only, not on biases and norm gains."""
    trainable = [p for p in params if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def warmup_cosine(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up over `warmup` steps, then a half cosine over `steps` down to 5% of `peak`."""
    warm = min(1.0, (step + 1) / warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return peak * warm * (0.05 + 0.95 * cosine)
