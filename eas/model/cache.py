"""KV-cache layout for skipped attention (transformers-notes.md §5).

A skipped layer never writes to the cache. With the default cache an unused slot at index 0 makes
`get_seq_length()` report 0, which breaks positions and masks of left-padded batches; so every
skipped slot is a `DummyLayer`, which the cache's bookkeeping skips.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedModel
from transformers.cache_utils import DummyLayer, DynamicCache


def make_cache(model: PreTrainedModel, skipped: Iterable[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    for i in skipped:
        cache.layers[i] = DummyLayer()
    return cache


def kv_cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by keys and values across all cache layers."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
