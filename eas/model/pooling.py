"""Per-sample prompt statistics for skipped and routed layers (eas-method.md §5).

Each EAS layer needs the mean m of its normalised input over the *prompt* positions of each sample
(padding, answer tokens and generated tokens excluded). m — and whatever a layer derives from it
(p and w, or a folded per-sample bias) — is computed on a pass that covers the whole prompt and is
then frozen for that sample, so decode steps reuse it.

A `PoolingState` is shared by all EAS layers of one model. The prompt mask comes from either an
explicit `prompt_context` (what eas.model.generation uses) or, failing that, from a forward
pre-hook that reads `attention_mask` and `labels` of each top-level call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class PoolingState:
    def __init__(self) -> None:
        self.prompt_mask: torch.Tensor | None = None  # [B, N] bool over the prompt positions
        self.explicit = False
        self._frozen: dict[str, Any] = {}

    def reset(self, prompt_mask: torch.Tensor | None, explicit: bool = False) -> None:
        self.prompt_mask = None if prompt_mask is None else prompt_mask.to(torch.bool)
        self.explicit = explicit
        self._frozen.clear()

    def per_sample(self, key: str, x_hat: torch.Tensor, derive: Callable[[torch.Tensor], Any]) -> Any:
        """derive(m) for the current batch; computed on a pass covering the whole prompt, frozen after.

        A pass is a prompt pass when it holds at least as many positions as the prompt mask (prefill,
        a training step, or a cache-free recomputation); only the first N positions, masked, are
        pooled. A shorter pass is a decode step and gets the frozen value.
        """
        mask = self.prompt_mask
        length = x_hat.shape[1]
        if mask is None:
            mask = torch.ones(x_hat.shape[:2], dtype=torch.bool, device=x_hat.device)
        if length >= mask.shape[1]:
            n = mask.shape[1]
            weights = mask.to(torch.float32)
            counts = weights.sum(dim=1, keepdim=True)
            if bool((counts == 0).any()):
                raise ValueError("a sample has no prompt positions to pool over")
            weights = (weights / counts).to(x_hat.dtype)
            m = torch.einsum("bn,bnd->bd", weights, x_hat[:, :n])
            value = derive(m)
            self._frozen[key] = value
            return value
        if key not in self._frozen:
            raise RuntimeError(f"{key}: decode step before the prompt was prefilled")
        return self._frozen[key]


def prompt_mask_from(attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                     length: int, device: torch.device) -> torch.Tensor:
    """Prompt positions of a batch: non-padding, and (in training) before the first supervised
    token of each sample (label != -100)."""
    if attention_mask is None:
        batch = labels.shape[0] if labels is not None else 1
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.to(torch.bool)
    if labels is not None:
        supervised = labels != -100
        positions = torch.arange(labels.shape[1], device=labels.device)
        first = torch.where(supervised, positions, labels.shape[1]).min(dim=1, keepdim=True).values
        mask = mask & (positions[None, :] < first)
    return mask


def install_hook(model: nn.Module, state: PoolingState) -> torch.utils.hooks.RemovableHandle:
    """Set the prompt mask from each top-level call unless an explicit context is active."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if state.explicit:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and ref.shape[1] < attention_mask.shape[1]:
            return  # a decode step (cached positions precede it): keep the frozen prompt statistics
        mask = prompt_mask_from(attention_mask, kwargs.get("labels"), ref.shape[1], ref.device)
        state.reset(mask)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


@contextmanager
def prompt_context(state: PoolingState, prompt_mask: torch.Tensor) -> Iterator[None]:
    """Pool over `prompt_mask` ([B, N]) for every forward inside the block (generation, tests)."""
    state.reset(prompt_mask, explicit=True)
    try:
        yield
    finally:
        state.reset(None)
