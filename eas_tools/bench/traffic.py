"""Bytes read per decode token: the memory-bandwidth bound of a decode speed-up.

Generating one token at small batch is limited by memory traffic, not arithmetic: every step reads every
weight the token passes through and every cached key and value it attends to. So the speed-up removing
work can give a decode step is at most (baseline bytes read) / (EAS bytes read), the way the FLOP ratio
(eas_tools/bench/flops.py) bounds prefill, which is compute-bound. Counted per decode step, from the
loaded model itself (so a skipped layer's removed attention is simply absent):

- weights: every parameter of the decoder's layers (less what a layer runs once per sample at prefill, such
  as a folded skipped layer's PIA down-projection) and of its final norm, the LM head whole, and one row
  of the input embedding (a lookup, unless the LM head shares that matrix, which is then read once); the
  vision tower and projector run once per request, before decoding, and are not counted;
- KV cache: per layer that still has attention, the keys and values of every position the new token
  attends to (the prompt, the tokens before it and itself), in the cache's dtype (the model's).

The step's writes (one new key/value per layer, the logits) and activations are a few kilobytes against
gigabytes and are left out. A batch of B reads the weights once and B caches; `batch` scales the KV part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from eas.model.arch import locate_decoder
from eas_tools.bench.flops import attention_dims
from eas_tools.bench.memory import tensor_bytes


@dataclass(frozen=True)
class DecodeBytes:
    """Mean bytes one decode step reads, over the steps of one request."""

    weights: int
    kv_cache: float  # mean over the decode steps (the cache grows by one position per step)
    attention_layers: int  # layers whose KV cache is read (skipped ones have none)
    decode_steps: int

    @property
    def per_step(self) -> float:
        return self.weights + self.kv_cache

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "per_step": self.per_step}


def _per_token_bytes(layer: nn.Module) -> int:
    """A decoder layer's parameters less those a module declares it runs once per sample (`eas_per_sample`:
    a folded skipped layer's PIA down-projection, used only to compute its biases at prefill)."""
    once = {id(p) for module in layer.modules() for name in getattr(module, "eas_per_sample", ())
            for p in getattr(module, name).parameters()}
    return tensor_bytes(p for p in layer.parameters() if id(p) not in once)


def decode_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads (see the module docstring)."""
    decoder = locate_decoder(model)
    total = sum(_per_token_bytes(layer) for layer in decoder.layers)
    norm = getattr(decoder.module, "norm", None)
    if isinstance(norm, nn.Module):
        total += tensor_bytes(norm.parameters())
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    weight = embed.weight
    if head is not None:
        total += tensor_bytes(head.parameters())
        if head.weight is weight:  # tied: the head's full read already covers the embedding row
            return total
    return total + weight.shape[-1] * weight.element_size()


def count_decode_bytes(model: nn.Module, prompt_tokens: int, new_tokens: int,
                       skipped: tuple[int, ...] | list[int] = (), batch: int = 1) -> DecodeBytes:
    """Mean bytes read per decode step of a request with `prompt_tokens` and `new_tokens` (the first token
    comes from the prefill; steps 1..n-1 decode)."""
    text = model.config.get_text_config(decoder=True)
    _, kv_heads, head_dim = attention_dims(text)
    attention_layers = text.num_hidden_layers - len(set(skipped))
    element = next(model.parameters()).element_size()  # the cache is kept in the model's dtype
    steps = max(0, new_tokens - 1)
    # step k (0-based) feeds token k+1 at position prompt_tokens + k: it reads prompt_tokens + k + 1 positions
    mean_positions = prompt_tokens + (steps + 1) / 2 if steps else 0.0
    kv = batch * attention_layers * 2 * kv_heads * head_dim * element * mean_positions
    return DecodeBytes(weights=decode_weight_bytes(model), kv_cache=kv, attention_layers=attention_layers,
                       decode_steps=steps)


def bytes_ratio(baseline: DecodeBytes, eas: DecodeBytes) -> float:
    """Baseline bytes / EAS bytes per decode step: the decode speed-up a memory-bound step can reach."""
    return baseline.per_step / eas.per_step if eas.per_step else 1.0
