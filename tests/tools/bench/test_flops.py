"""The analytic FLOP counter: a hand count on the tiny geometry, torch's own counter on real forward passes,
and the ratio's direction (no skipping is exactly 1, more skipping is more)."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from eas.model.adapters import AdapterConfig
from eas.model.cache import make_cache
from eas.model.convert import apply_plan
from eas.model.fold import fold_model
from eas.model.loading import LoadedModel
from eas.model.plan import SkipPlan
from eas.model.pooling import prompt_context
from eas.zoo.llava import TINY, build_llava, build_llava_config
from eas_tools.bench.flops import Shape, count_flops, flop_ratios
from tests.core.helpers import images

# TINY: 32-px images in 8-px patches (16 patches + CLS), vision 32 wide (MLP 128), 2 vision layers;
# decoder 64 wide, FFN 128, 4 layers, 4 query heads and 2 KV heads of 16, vocabulary 512.
L = 27  # prompt tokens (16 image tokens + text)
VISION_MACS = 16 * 3 * 8 * 8 * 32 + 2 * (17 * (4 * 32 * 32 + 2 * 32 * 128) + 2 * 17 * 17 * 32)
PROJECTOR_MACS = 16 * (32 * 64 + 64 * 64)


def attn_macs(queries: int, keys: int) -> int:
    # q and o are 64×64, k and v are 64×32 (2 KV heads × 16); scores: QKᵀ and AV over 4 heads × 16.
    return queries * (64 * 64 * 2 + 64 * 32 * 2) + 2 * queries * keys * 64


FFN_MACS_PER_TOKEN = 3 * 64 * 128
LM_HEAD_MACS = 64 * 512


def test_shape_reads_the_tiny_config() -> None:
    s = Shape.from_config(build_llava_config(TINY))
    assert (s.image_tokens, s.heads, s.kv_heads, s.head_dim, s.layers, s.vocab) == (16, 4, 2, 16, 4, 512)


def test_baseline_count_matches_a_hand_count() -> None:
    count = count_flops(build_llava_config(TINY), prompt_tokens=L, new_tokens=3)
    assert count.vision == 2 * VISION_MACS
    assert count.projector == 2 * PROJECTOR_MACS
    assert count.prefill == 2 * (4 * attn_macs(L, L) + 4 * L * FFN_MACS_PER_TOKEN + LM_HEAD_MACS)
    # 3 new tokens: the prefill yields the first, two decode steps see 28 and 29 positions.
    steps = [4 * attn_macs(1, keys) + 4 * FFN_MACS_PER_TOKEN + LM_HEAD_MACS for keys in (L + 1, L + 2)]
    assert count.decode == 2 * sum(steps)
    assert count.decode_steps == 2
    assert count.total == count.vision + count.projector + count.prefill + count.decode


def test_eas_count_drops_the_skipped_attention_and_adds_only_the_per_sample_bias() -> None:
    config = build_llava_config(TINY)
    base = count_flops(config, L, 3)
    eas = count_flops(config, L, 3, skipped=(1, 3), pia_rank=32)
    # per skipped layer, once: pooling (L·d) and the folded bias (r·d + 2·d_ff·r)
    once = 2 * (L * 64 + 32 * 64 + 2 * 128 * 32)
    assert eas.prefill == base.prefill - 2 * 2 * attn_macs(L, L) + 2 * once
    assert eas.decode == base.decode - 2 * 2 * (attn_macs(1, L + 1) + attn_macs(1, L + 2))
    assert eas.vision == base.vision and eas.projector == base.projector


def test_no_skipping_is_ratio_one_and_more_skipping_raises_it() -> None:
    config = build_llava_config(TINY)
    base = count_flops(config, L, 8)
    assert flop_ratios(base, count_flops(config, L, 8, skipped=(), pia_rank=32)) == {
        "total": 1.0, "prefill": 1.0, "per_decode_token": 1.0, "vision": 1.0}
    ratios = [flop_ratios(base, count_flops(config, L, 8, skipped=tuple(range(4 - k, 4)), pia_rank=32))["total"]
              for k in range(4)]
    assert ratios[0] == 1.0
    assert all(a < b for a, b in itertools.pairwise(ratios))


def test_out_of_range_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        count_flops(build_llava_config(TINY), L, 2, skipped=(4,))


def _counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("skipped", [(), (1, 3)])
def test_count_equals_torch_flop_counter_on_real_passes(skipped: tuple[int, ...]) -> None:
    """torch counts every matmul and convolution it runs; with eager attention the scores are matmuls too
    (SDPA on CPU is not counted by torch). Prefill and one decode step must agree exactly."""
    model, processor = build_llava(TINY, seed=0)
    model.set_attn_implementation("eager")
    rank = 0
    if skipped:
        apply_plan(model, SkipPlan(skipped=skipped, num_layers=4), AdapterConfig())
        fold_model(model)
        rank = AdapterConfig().pia_rank
    batch = LoadedModel(model=model, processor=processor).prepare(images(1), ["what colour is the circle?"])
    prompt = batch["input_ids"].shape[1]
    cache = make_cache(model, skipped)
    runtime = getattr(model, "_eas_runtime", None)
    with torch.no_grad():
        context = prompt_context(runtime.state, batch["attention_mask"]) if runtime else contextlib.nullcontext()
        with context:
            prefill = _counted(lambda: model(**batch, past_key_values=cache, use_cache=True, logits_to_keep=1))
            mask = torch.cat([batch["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
            step = _counted(lambda: model(input_ids=torch.tensor([[5]]), attention_mask=mask, past_key_values=cache,
                                          use_cache=True, logits_to_keep=1))
    expected = count_flops(model.config, prompt, new_tokens=2, skipped=skipped, pia_rank=rank)
    assert prefill == expected.vision + expected.projector + expected.prefill
    assert step == expected.decode


def test_causal_scores_count_half_the_prompt_pairs_and_give_a_smaller_ratio() -> None:
    config = build_llava_config(TINY)
    full, causal = count_flops(config, L, 3), count_flops(config, L, 3, causal=True)
    assert full.prefill - causal.prefill == 2 * 4 * 2 * (L * L - L * (L + 1) // 2) * 64
    assert full.decode == causal.decode and full.vision == causal.vision
    eas_full = count_flops(config, L, 3, skipped=(2, 3), pia_rank=32)
    eas_causal = count_flops(config, L, 3, skipped=(2, 3), pia_rank=32, causal=True)
    assert 1.0 < flop_ratios(causal, eas_causal)["total"] < flop_ratios(full, eas_full)["total"]
