"""Analytic FLOPs of one LLaVA request, from the config alone: the theoretical reference for a speed-up.

Convention: a multiply-accumulate is 2 FLOPs; only matrix products are counted (norms, activations,
softmax, rotary embeddings and residual adds are left out: they are a fraction of a percent here and
do not change between the variants). Counted, per sample:

- vision tower: patch embedding (a convolution) plus, per layer over all `n_patches + 1` tokens, the
  q/k/v/o projections, QKᵀ and AV over the full (bidirectional) sequence, and the MLP. Every vision
  layer runs, whichever layer feeds the projector;
- projector: two linear layers over the image tokens;
- prefill over the L prompt tokens (image tokens included): per decoder layer q/k/v/o (with grouped
  KV heads), QKᵀ and AV over the **full L×L score matrix** by default (what masked SDPA computes on a
  left-padded batch), or over its causal half (`causal=True`: what a causal kernel needs for an unpadded
  prompt). The causal count gives attention a smaller share and so a smaller FLOP ratio: the full count is
  the stricter reference for "EAS is at least as fast as its FLOPs say". Then the gated FFN (gate, up,
  down) and the LM head for the last position only (generation asks for one position's logits);
- each decode step: the same per layer for one token attending to every cached position plus itself,
  and the LM head for that token. A request of n new tokens runs the prefill (token 1) and n − 1 decode
  steps.

An EAS model drops the skipped layers' whole attention (projections and scores). A folded PIA adds
nothing per token (tests/core/test_decode_cost.py), only its per-sample work once at prefill: pooling the
prompt (`L·d`) and the bias (`r·d + 2·d_ff·r` MACs per skipped layer, eas-method.md §10 B); kept-layer folds
add q/k/v biases (adds, not counted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from transformers import PretrainedConfig


class UnsupportedConfig(ValueError):
    """The FLOP counter knows LLaVA-style configs (CLIP vision tower, Llama-style decoder) only."""


def attention_dims(text: PretrainedConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a decoder config (grouped KV heads and an explicit head_dim
    when it sets them)."""
    heads = text.num_attention_heads
    return heads, getattr(text, "num_key_value_heads", None) or heads, \
        getattr(text, "head_dim", None) or text.hidden_size // heads


@dataclass(frozen=True)
class Shape:
    """The sizes the count needs, read from a config."""

    # vision tower (CLIP)
    image_size: int
    patch_size: int
    channels: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_tokens: int  # tokens the projector emits per image (patches; CLS dropped by the "default" strategy)
    projector_in: int
    # decoder
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> Shape:
        vision = getattr(config, "vision_config", None)
        text = config.get_text_config(decoder=True)
        if vision is None or not hasattr(vision, "patch_size") or not hasattr(text, "intermediate_size"):
            raise UnsupportedConfig(f"{type(config).__name__}: FLOPs are counted for LLaVA-style configs only")
        patches = (vision.image_size // vision.patch_size) ** 2
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        feature_layers = getattr(config, "vision_feature_layer", -1)
        n_feature_layers = len(feature_layers) if isinstance(feature_layers, list | tuple) else 1
        heads, kv_heads, head_dim = attention_dims(text)
        return cls(
            image_size=vision.image_size, patch_size=vision.patch_size,
            channels=getattr(vision, "num_channels", 3), vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, vision_layers=vision.num_hidden_layers,
            image_tokens=patches if strategy == "default" else patches + 1,
            projector_in=vision.hidden_size * n_feature_layers,
            hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
            heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=text.vocab_size,
        )


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one sample's request: vision, projector, prefill (decoder + LM head), all decode steps."""

    vision: int
    projector: int
    prefill: int
    decode: int
    decode_steps: int
    prompt_tokens: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.prefill + self.decode

    @property
    def per_decode_token(self) -> float:
        return self.decode / self.decode_steps if self.decode_steps else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total, "per_decode_token": self.per_decode_token}


def vision_macs(s: Shape) -> tuple[int, int]:
    """(vision tower, projector) MACs for one image."""
    patches = (s.image_size // s.patch_size) ** 2
    tokens = patches + 1  # + CLS
    d, ff = s.vision_hidden, s.vision_intermediate
    embed = patches * s.channels * s.patch_size**2 * d
    per_layer = tokens * (4 * d * d + 2 * d * ff) + 2 * tokens * tokens * d
    projector = s.image_tokens * (s.projector_in * s.hidden + s.hidden * s.hidden)
    return embed + s.vision_layers * per_layer, projector


def attention_macs(s: Shape, queries: int, keys: int, causal: bool = False) -> int:
    """One decoder layer's attention for `queries` new tokens over `keys` positions (scores included).
    `causal`: query i of a prompt (queries == keys) sees positions 1..i only."""
    q_width, kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim
    projections = queries * (2 * s.hidden * q_width + 2 * s.hidden * kv_width)  # q, o and k, v
    pairs = queries * (queries + 1) // 2 if causal and queries == keys else queries * keys
    scores = 2 * pairs * q_width  # QKᵀ and AV, every query head
    return projections + scores


def ffn_macs(s: Shape, tokens: int) -> int:
    return tokens * 3 * s.hidden * s.intermediate


def count_flops(config: PretrainedConfig | Shape, prompt_tokens: int, new_tokens: int,
                skipped: Iterable[int] = (), pia_rank: int = 0, causal: bool = False) -> FlopCount:
    """FLOPs of one sample: a prompt of `prompt_tokens` (image tokens included) and `new_tokens` generated."""
    s = config if isinstance(config, Shape) else Shape.from_config(config)
    skipped = set(skipped)
    if bad := [i for i in skipped if not 0 <= i < s.layers]:
        raise ValueError(f"skipped layer {bad[0]} out of range 0..{s.layers - 1}")
    kept = s.layers - len(skipped)
    L = prompt_tokens
    vision, projector = vision_macs(s)
    # Per skipped layer, once per sample: pooling the prompt (L·d) and the folded PIA's bias (r·d + 2·d_ff·r).
    eas_once = len(skipped) * (L * s.hidden + pia_rank * s.hidden + 2 * s.intermediate * pia_rank)
    prefill = kept * attention_macs(s, L, L, causal) + s.layers * ffn_macs(s, L) + s.hidden * s.vocab + eas_once
    steps = max(0, new_tokens - 1)
    decode = 0
    for k in range(steps):  # step k feeds token k+1 at position L + k: it attends to L + k + 1 positions
        decode += kept * attention_macs(s, 1, L + k + 1) + s.layers * ffn_macs(s, 1) + s.hidden * s.vocab
    return FlopCount(vision=2 * vision, projector=2 * projector, prefill=2 * prefill, decode=2 * decode,
                     decode_steps=steps, prompt_tokens=L)


def flop_ratios(baseline: FlopCount, eas: FlopCount) -> dict[str, float]:
    """Baseline FLOPs / EAS FLOPs: the speed-up that removing the work alone would give."""
    return {
        "total": baseline.total / eas.total,
        "prefill": baseline.prefill / eas.prefill,
        "per_decode_token": (baseline.per_decode_token / eas.per_decode_token) if eas.decode_steps else 1.0,
        "vision": baseline.vision / eas.vision,
    }
