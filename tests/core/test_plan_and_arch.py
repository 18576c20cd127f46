"""Skip-plan validation and architecture refusal (nothing is modified on refusal)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from eas.model.adapters import AdapterConfig
from eas.model.arch import UnsupportedModelError, locate_decoder
from eas.model.cache import make_cache
from eas.model.convert import ConversionError, apply_plan
from eas.model.plan import PlanError, SkipPlan, model_fingerprint
from eas.zoo.llava import build_llava
from tests.core.helpers import llava_batch


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"skipped": (4,), "num_layers": 4}, "out of range"),
        ({"skipped": (-1,), "num_layers": 4}, "out of range"),
        ({"skipped": (1, 1), "num_layers": 4}, "duplicate"),
        ({"skipped": (0, 1, 2, 3), "num_layers": 4}, "at least one must be kept"),
        ({"skipped": (1,), "num_layers": 4, "scores": (0.1, 0.2)}, "scores has 2 entries"),
    ],
)
def test_plan_validation_errors(kwargs, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SkipPlan(**kwargs)


def test_plan_round_trips_json_and_sorts() -> None:
    plan = SkipPlan(skipped=(3, 1), num_layers=4, criterion="cosine", scores=(0.1, 0.9, 0.2, 0.8), fingerprint="ab")
    assert plan.skipped == (1, 3) and plan.kept == (0, 2)
    assert SkipPlan.from_json(plan.to_json()) == plan


def test_wrong_fingerprint_is_refused_and_model_untouched() -> None:
    model, other = _llama(0), _llama(1)
    plan = SkipPlan(skipped=(1,), num_layers=4, fingerprint=model_fingerprint(other))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="different source model"):
        apply_plan(model, plan)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    good = SkipPlan(skipped=(1,), num_layers=4, fingerprint=model_fingerprint(model))
    apply_plan(model, good)  # the right fingerprint is accepted


def test_fingerprint_is_dtype_independent_but_weight_sensitive() -> None:
    model = _llama(0)
    assert model_fingerprint(model) == model_fingerprint(_llama(0).to(torch.bfloat16))
    assert model_fingerprint(model) != model_fingerprint(_llama(1))


def test_plan_for_other_depth_is_refused() -> None:
    with pytest.raises(PlanError, match="6 decoder layers"):
        apply_plan(_llama(), SkipPlan(skipped=(1,), num_layers=6))


def test_unknown_class_is_refused() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel: no text decoder found"):
        apply_plan(model, SkipPlan(skipped=(1,), num_layers=2))


def test_post_ln_and_ungated_layers_are_refused_before_any_change() -> None:
    model = _llama()
    layer = model.model.layers[2]
    norm = layer.input_layernorm
    del layer.input_layernorm  # a post-LN block has no input norm
    keys = set(model.state_dict())
    with pytest.raises(UnsupportedModelError, match="post-LN"):
        apply_plan(model, SkipPlan(skipped=(1,), num_layers=4))
    assert set(model.state_dict()) == keys and not hasattr(model, "_eas_runtime")
    layer.input_layernorm = norm
    layer.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))  # non-gated FFN
    with pytest.raises(UnsupportedModelError, match="gated"):
        apply_plan(model, SkipPlan(skipped=(1,), num_layers=4))


def test_locator_finds_llava_decoder() -> None:
    model, _ = build_llava()
    decoder = locate_decoder(model)
    assert decoder.family == "LlavaForConditionalGeneration" and decoder.num_layers == 4
    assert decoder.layers is model.model.language_model.layers


def test_routed_model_cannot_be_built_folded() -> None:
    with pytest.raises(ConversionError, match="router"):
        apply_plan(_llama(), SkipPlan(skipped=(1,), num_layers=4), AdapterConfig(router=True), merged=True)


def test_default_cache_breaks_with_layer0_skipped_dummy_cache_does_not() -> None:
    """Why skipped slots are DummyLayers (transformers-notes.md §5): an unused slot 0 reports 0."""
    model, processor = build_llava()
    apply_plan(model, SkipPlan(skipped=(0, 2), num_layers=4), AdapterConfig())
    batch = llava_batch(processor)
    from transformers.cache_utils import DynamicCache

    plain = DynamicCache(config=model.config.get_text_config(decoder=True))
    dummy = make_cache(model, (0, 2))
    with torch.no_grad():
        model(**batch, past_key_values=plain, use_cache=True)
        model(**batch, past_key_values=dummy, use_cache=True)
    assert plain.get_seq_length() == 0
    assert dummy.get_seq_length() == batch["input_ids"].shape[1]
