"""Per-sample prompt statistics for skipped and routed layers (eas-method.md §5).

Each EAS layer needs the mean m of its normalised input over the *prompt* positions of each sample
(padding, answer tokens and generated tokens excluded). m — and whatever a layer derives from it
(p and w, or a folded per-sample bias) — is computed on a pass that covers the whole prompt and is
then frozen for that sample, so decode steps reuse it.

A `PoolingState` is shared by all EAS layers of one model. The prompt mask comes from, in order:
1. an explicit `prompt_context` (tests and research code that drive the forward passes themselves);
2. a *generation session* (`generation_session`, opened by the `generate` that eas.model.stock_generate
   installs on every converted model): the first top-level forward of the call is the prefill, its
   attention mask is the prompt mask, and it stays frozen for every later forward of that call — decode
   steps, and the full recomputations of `use_cache=False`, which must not pool the generated tokens;
3. otherwise a forward pre-hook that reads `attention_mask` and `labels` of each top-level call.

Every top-level call also says whether it continues a cache (a decode step: its input is shorter than
its attention mask, or the cache it gets already holds tokens); a continuation always reuses the frozen
statistics.
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
        self.session = False  # inside a generate call: the mask is the first forward's, frozen after it
        self.captured = False  # the session's prefill has set the prompt mask
        self.continuation = False  # the current top-level call continues a cache (a decode step)
        self._frozen: dict[str, Any] = {}

    def reset(self, prompt_mask: torch.Tensor | None, explicit: bool = False) -> None:
        self.prompt_mask = None if prompt_mask is None else prompt_mask.to(torch.bool)
        self.explicit = explicit
        self.continuation = False
        self._frozen.clear()

    def per_sample(self, key: str, x_hat: torch.Tensor, derive: Callable[[torch.Tensor], Any]) -> Any:
        """derive(m) for the current batch; computed on a pass covering the whole prompt, frozen after.

        A pass is a prompt pass when it starts at position 0 and holds at least as many positions as the
        prompt mask (prefill, a training step, or a cache-free recomputation); only the first N positions,
        masked, are pooled. A continuation of a cache, or a shorter pass, is a decode step and gets the
        frozen value.
        """
        mask = self.prompt_mask
        length = x_hat.shape[1]
        if mask is None:
            mask = torch.ones(x_hat.shape[:2], dtype=torch.bool, device=x_hat.device)
        if not self.continuation and length >= mask.shape[1]:
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
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return
        attention_mask = kwargs.get("attention_mask")
        continuation = _continues_cache(ref, attention_mask, kwargs.get("past_key_values"))
        if state.explicit:
            state.continuation = continuation
            return
        if state.session:
            if not state.captured:
                if continuation:
                    raise RuntimeError("an EAS model cannot continue a cache filled outside this generate call: "
                                       "its prompt statistics come from the prefill")
                state.reset(prompt_mask_from(attention_mask, None, ref.shape[1], ref.device))
                state.captured = True
            state.continuation = continuation
            return
        if continuation:
            state.continuation = True  # a decode step: keep the frozen prompt statistics
            return
        mask = prompt_mask_from(attention_mask, kwargs.get("labels"), ref.shape[1], ref.device)
        state.reset(mask)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    # Lazy: both import this module. An exact `generate`, and a `save_pretrained` that writes the
    # directory format plain transformers cannot misread (eas.model.artefact).
    from eas.model.artefact import install_save
    from eas.model.stock_generate import install_generate

    install_generate(model, state)
    install_save(model)
    return handle


def _continues_cache(ref: torch.Tensor, attention_mask: torch.Tensor | None, cache: object) -> bool:
    """Whether a top-level call continues cached positions (a decode step) rather than starting at 0."""
    if attention_mask is not None and ref.shape[1] < attention_mask.shape[1]:
        return True
    get_seq_length = getattr(cache, "get_seq_length", None)
    if get_seq_length is None:
        return False
    try:
        return get_seq_length() > 0
    except ValueError:  # a cache of DummyLayers only (every attention skipped) has no length
        return False


@contextmanager
def generation_session(state: PoolingState) -> Iterator[None]:
    """One generate call: the first top-level forward sets the prompt mask, frozen until the call ends.
    Inside an explicit `prompt_context` the explicit mask keeps precedence."""
    if state.explicit:
        yield
        return
    if state.session:
        raise RuntimeError("generate is already running on this EAS model (one call at a time per model)")
    state.reset(None)
    state.session, state.captured = True, False
    try:
        yield
    finally:
        state.session, state.captured = False, False
        state.reset(None)


@contextmanager
def prompt_context(state: PoolingState, prompt_mask: torch.Tensor) -> Iterator[None]:
    """Pool over `prompt_mask` ([B, N]) for every forward inside the block (generation, tests)."""
    state.reset(prompt_mask, explicit=True)
    try:
        yield
    finally:
        state.reset(None)
