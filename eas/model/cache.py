"""KV-cache layout for skipped attention (transformers-notes.md §5).

A skipped layer never writes to the cache. With the default cache an unused slot at index 0 makes
`get_seq_length()` report 0, which breaks positions and masks of left-padded batches; so every
skipped slot is a `DummyLayer`, which the cache's bookkeeping skips. `make_cache` builds such a cache;
`dummy_skipped_slots` fixes one that transformers' `generate` built (eas.model.stock_generate).
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedModel
from transformers.cache_utils import DummyLayer, DynamicCache


def make_cache(model: PreTrainedModel, skipped: Iterable[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    return dummy_skipped_slots(cache, skipped)


def dummy_skipped_slots(cache: DynamicCache, skipped: Iterable[int]) -> DynamicCache:
    """Put a DummyLayer in every skipped slot of `cache`, in place. A slot that already holds keys is
    refused: the cache was filled by another model (or a conversion with another plan)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no per-layer slots; an EAS model needs a DynamicCache")
    for i in skipped:
        if i >= len(layers):
            raise ValueError(f"the cache has {len(layers)} layer slots; skipped layer {i} has none")
        layer = layers[i]
        if isinstance(layer, DummyLayer):
            continue
        if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            raise ValueError(f"cache slot {i} holds keys, but layer {i}'s attention is skipped")
        layers[i] = DummyLayer()
    return cache


def kv_cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by keys and values across all cache layers."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
