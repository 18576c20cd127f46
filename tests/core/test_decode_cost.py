"""A folded skipped layer costs, per decode token, exactly the FFN's matmuls (plus bias adds)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from eas.model.cache import make_cache
from eas.model.fold import fold_model
from eas.model.layers import MergedSkippedLayer, SkippedLayer
from tests.core.helpers import converted_llava, llava_batch


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_merged_skipped_layer_decode_flops_equal_plain_ffn() -> None:
    model, processor = converted_llava((1, 3))
    layers = model.model.language_model.layers
    unmerged_layer = layers[1]
    assert isinstance(unmerged_layer, SkippedLayer)
    batch = llava_batch(processor)
    cache = make_cache(model, (1, 3))
    with torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True)  # prefill freezes per-sample stats
    x = torch.randn(2, 1, model.config.text_config.hidden_size)
    with torch.no_grad():
        adapter_form = _flops(lambda: unmerged_layer(x))
    fold_model(model)
    merged = layers[1]
    assert isinstance(merged, MergedSkippedLayer)
    with torch.no_grad():
        model(**batch, past_key_values=make_cache(model, (1, 3)), use_cache=True)
        merged_decode = _flops(lambda: merged(x))
        plain_ffn = _flops(lambda: merged.mlp(merged.input_layernorm(x)))
    assert merged_decode == plain_ffn > 0
    assert adapter_form > plain_ffn  # the un-merged PIA side path really costs extra
