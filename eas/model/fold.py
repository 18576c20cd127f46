"""Exact re-parameterization of trained adapters (eas-method.md §8, §10 B).

The math is in two pure functions, computed in fp64 and cast back; `fold_model` swaps the modules.
Biases are always computed from the ORIGINAL weights (the public merge code uses the updated weight,
which multiplies the bias by M and applies g_f twice — eas-method.md §9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from eas.model.arch import effective_gain, gate_up_weights, locate_decoder
from eas.model.convert import CONFIG_KEY, ConversionError, add_qkv_bias, eas_runtime
from eas.model.layers import AdaptedNorm, MergedSkippedLayer, SkippedLayer


@dataclass(frozen=True)
class SkippedFold:
    """W_k' = W_k diag(g_f) M; per-sample bias b_k = V_k p + κ_k (b_C absorbed into κ_k)."""

    gate_weight: torch.Tensor
    up_weight: torch.Tensor
    V_gate: torch.Tensor
    V_up: torch.Tensor
    kappa_gate: torch.Tensor
    kappa_up: torch.Tensor


def fold_skipped(W_gate: torch.Tensor, W_up: torch.Tensor, g_f: torch.Tensor, U: torch.Tensor,
                 u: torch.Tensor, C: torch.Tensor, b_C: torch.Tensor) -> SkippedFold:
    """Router-free PIA: M = I + ½ U C, c = ½ U (p + b_C) + u (all tensors fp64)."""
    d = C.shape[1]
    M = torch.eye(d, dtype=C.dtype, device=C.device) + 0.5 * U @ C
    out = {}
    for name, W in (("gate", W_gate), ("up", W_up)):
        Wg = W * g_f  # W_k diag(g_f)
        V = 0.5 * Wg @ U
        out[f"{name}_weight"] = Wg @ M
        out[f"V_{name}"] = V
        out[f"kappa_{name}"] = W @ (g_f * u) + V @ b_C
    return SkippedFold(**out)


def fold_kept(W_x: torch.Tensor, b_x: torch.Tensor | None, U_f: torch.Tensor, u_f: torch.Tensor,
              A_f: torch.Tensor, b_Af: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router-free kept adapter into a projection: W' = W M_f, b' = W c_f + b, with
    M_f = I + U_f A_f and c_f = U_f b_Af + u_f."""
    d = A_f.shape[1]
    M_f = torch.eye(d, dtype=A_f.dtype, device=A_f.device) + U_f @ A_f
    c_f = U_f @ b_Af + u_f
    bias = W_x @ c_f
    if b_x is not None:
        bias = bias + b_x
    return W_x @ M_f, bias


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _up(mix) -> tuple[torch.Tensor, torch.Tensor]:
    """U = s·B and u = s·b_B of a router-free mixture."""
    return mix.scale * _f64(mix.B.dense()), mix.scale * _f64(mix.B.bias)


@torch.no_grad()
def fold_model(model: PreTrainedModel) -> PreTrainedModel:
    """Replace every adapter by its exact fold, in place. The model must be router-free."""
    runtime = eas_runtime(model)
    if runtime is None:
        raise ConversionError("model is not converted: nothing to fold")
    if runtime.merged:
        raise ConversionError("model is already folded")
    if runtime.adapters.router:
        raise ConversionError(
            "routed adapters make the folded weights per sample (eas-method.md §10 A); "
            "convert with router=False to serve a folded model, or serve the adapter form"
        )
    was_training = model.training
    model.eval()
    decoder = locate_decoder(model)
    for i, layer in enumerate(decoder.layers):
        if isinstance(layer, SkippedLayer):
            decoder.layers[i] = _fold_skipped_layer(layer, runtime.adapters.pia_rank)
        elif isinstance(layer.input_layernorm, AdaptedNorm):
            _fold_kept_layer(layer)
    text = decoder.text_config
    getattr(text, CONFIG_KEY)["merged"] = True
    runtime.merged = True
    model.train(was_training)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _fold_skipped_layer(layer: SkippedLayer, rank: int) -> MergedSkippedLayer:
    mlp, pia = layer.mlp, layer.pia
    W_gate, W_up = gate_up_weights(mlp)  # views of gate_up_proj when the FFN fuses them
    dtype = W_gate.dtype
    U, u = _up(pia.mix)
    fold = fold_skipped(_f64(W_gate), _f64(W_up), _f64(effective_gain(layer.ffn_norm)), U, u,
                        _f64(pia.C.weight), _f64(pia.C.bias))
    merged = MergedSkippedLayer(layer, layer._state, layer.layer_idx, rank)
    merged.to(W_gate.device)
    W_gate.copy_(fold.gate_weight.to(dtype))
    W_up.copy_(fold.up_weight.to(dtype))
    merged.pia_A.weight.copy_(pia.A.weight)
    merged.pia_A.bias.copy_(pia.A.bias)
    for name in ("V_gate", "V_up", "kappa_gate", "kappa_up"):
        getattr(merged, name).copy_(getattr(fold, name).to(dtype))
    return merged


def _fold_kept_layer(layer: nn.Module) -> None:
    adapted: AdaptedNorm = layer.input_layernorm
    adapter = adapted.adapter
    U_f, u_f = _up(adapter.mix)
    A_f, b_Af = _f64(adapter.A.weight), _f64(adapter.A.bias)
    attn = layer.self_attn
    originals = {n: (_f64(getattr(attn, n).weight),
                     None if getattr(attn, n).bias is None else _f64(getattr(attn, n).bias))
                 for n in ("q_proj", "k_proj", "v_proj")}
    add_qkv_bias(attn)
    for name, (W, b) in originals.items():
        proj = getattr(attn, name)
        W_new, b_new = fold_kept(W, b, U_f, u_f, A_f, b_Af)
        proj.weight.copy_(W_new.to(proj.weight.dtype))
        proj.bias.copy_(b_new.to(proj.bias.dtype))
    layer.input_layernorm = adapted.norm
