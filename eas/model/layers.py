"""Decoder-layer replacements for EAS (eas-method.md §2, §8).

- `AdaptedNorm` wraps a kept layer's `input_layernorm`: Q/K/V see Ad(x̂); the residual keeps raw x.
- `SkippedLayer` is the adapter form of a skipped layer: y = x + FFN(g_f ⊙ PIA(x̂)); in a sandwich block
  (Gemma 2/3) g_f is pre_feedforward_layernorm's gain and post_feedforward_layernorm still follows the FFN.
- `MergedSkippedLayer` is its fold: y = x + W_d(act(W_g' x̂ + b_g) ⊙ (W_u' x̂ + b_u)), with the
  per-sample biases b_k = V_k p + κ_k computed once per sample at prefill (§10 B).

Skipped layers hold no `self_attn` (the weights are gone) and never touch the KV cache. They return a
tensor, like every transformers 5.x decoder layer, and keep the list index of the layer they replace.
"""

from __future__ import annotations

import torch
from torch import nn

from eas.model.adapters import PIA, RoutedAdapter
from eas.model.arch import effective_gain, gate_up_weights, gated_ffn, layer_form
from eas.model.pooling import PoolingState


class AdaptedNorm(nn.Module):
    """input_layernorm followed by the kept-layer adapter."""

    eas_wrapped = True  # eas.model.arch checks the norm inside

    def __init__(self, norm: nn.Module, adapter: RoutedAdapter, state: PoolingState, key: str) -> None:
        super().__init__()
        self.norm = norm
        self.adapter = adapter
        self._state = state
        self._key = key

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the norm's gain keeps working
        return self.norm.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x_hat = self.norm(hidden_states)
        w = self._state.per_sample(self._key, x_hat, self.adapter.prefill) if self.adapter.routed else None
        return self.adapter(x_hat, w)


class _SkippedBase(nn.Module):
    """What both forms of a skipped layer keep: input_layernorm, the FFN and, for a sandwich block, the norm
    on the FFN output (eas.model.arch.BlockForm). Sub-modules keep their stock names, so a saved model's keys
    are the stock keys minus the dropped ones."""

    eas_skipped = True

    def __init__(self, layer: nn.Module, state: PoolingState, layer_idx: int) -> None:
        super().__init__()
        form = layer_form(layer_idx, layer)
        self.eas_form = form
        self.input_layernorm = layer.input_layernorm
        self.mlp = layer.mlp
        if form.ffn_out_norm is not None:
            setattr(self, form.ffn_out_norm, getattr(layer, form.ffn_out_norm))
        self.layer_idx = layer_idx
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type
        self._state = state
        self._key = f"layer{layer_idx}"

    def _ffn_out(self, out: torch.Tensor) -> torch.Tensor:
        name = self.eas_form.ffn_out_norm
        return out if name is None else getattr(self, name)(out)


class SkippedLayer(_SkippedBase):
    """Adapter form: y = x + [ffn_out_norm](FFN(g_f ⊙ PIA(x̂))). The FFN's input norm (post_attention_layernorm
    in a pre-norm block, pre_feedforward_layernorm in a sandwich block) is kept only for its gain g_f."""

    def __init__(self, layer: nn.Module, pia: PIA, state: PoolingState, layer_idx: int) -> None:
        super().__init__(layer, state, layer_idx)
        setattr(self, self.eas_form.ffn_norm, getattr(layer, self.eas_form.ffn_norm))
        self.pia = pia

    @property
    def ffn_norm(self) -> nn.Module:
        return getattr(self, self.eas_form.ffn_norm)

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        x_hat = self.input_layernorm(hidden_states)
        stats = self._state.per_sample(self._key, x_hat, self.pia.prefill)
        h = self.pia(x_hat, stats) * effective_gain(self.ffn_norm)
        return hidden_states + self._ffn_out(self.mlp(h))


class MergedSkippedLayer(_SkippedBase):
    """Folded form. gate/up hold W_k' = W_k diag(g_f) M; the per-sample bias needs A (for p) and
    V_k, κ_k; decode costs one RMSNorm, one FFN and two bias adds (plus the FFN-output norm of a
    sandwich block, which the stock layer computes too)."""

    # Sub-modules run once per sample, at prefill (for the biases), never per generated token: a decode
    # step does not read their weights (eas_tools/bench/traffic.py counts what a step reads).
    eas_per_sample = ("pia_A",)

    def __init__(self, layer: nn.Module, state: PoolingState, layer_idx: int, rank: int) -> None:
        super().__init__(layer, state, layer_idx)
        gate_weight, _ = gate_up_weights(self.mlp)
        ffn, hidden = gate_weight.shape
        dtype = gate_weight.dtype
        self.pia_A = nn.Linear(hidden, rank, dtype=dtype)
        self.register_buffer("V_gate", torch.zeros(ffn, rank, dtype=dtype))
        self.register_buffer("V_up", torch.zeros(ffn, rank, dtype=dtype))
        self.register_buffer("kappa_gate", torch.zeros(ffn, dtype=dtype))
        self.register_buffer("kappa_up", torch.zeros(ffn, dtype=dtype))

    def sample_biases(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pia_A(m)
        return p @ self.V_gate.T + self.kappa_gate, p @ self.V_up.T + self.kappa_up

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        x_hat = self.input_layernorm(hidden_states)
        b_gate, b_up = self._state.per_sample(self._key, x_hat, self.sample_biases)
        return hidden_states + self._ffn_out(gated_ffn(self.mlp, x_hat, b_gate, b_up))
