"""The rules behind the family support (docs/eas-core.md, "Supported families"), each with a negative control.

- The skipped form accounts for every sub-module: with an identity input gain and an identity PIA, a
  skipped layer computes exactly the stock layer with its attention output zeroed; the pre-fix form
  (gain from post_attention_layernorm, sandwich norms dropped) does not, on a sandwich block.
- Each fold rule is needed: dropping the Gemma `1 + w` gain, the q/k/v bias or the FFN-output norm of a
  sandwich block (Gemma and GLM names) makes the folded model differ from the adapter form.
- Every refused family is refused with its reason, and the model is left bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from torch import nn

import eas.model.fold as fold_module
from eas.model.adapters import AdapterConfig
from eas.model.arch import UnsupportedModelError, effective_gain, locate_decoder
from eas.model.convert import apply_plan
from eas.model.fold import fold_model
from eas.model.layers import MergedSkippedLayer, SkippedLayer
from eas.model.plan import SkipPlan
from eas.model.pooling import PoolingState
from eas.zoo.families import CLIP, SIGLIP, build_family
from tests.core.helpers import perturb
from tests.core.test_family_exactness import converted_family, family_batch, valid_logits

IDENTITY_PIA = AdapterConfig(pia_rank=16, kept_rank=8, dropout=0.0)  # B = 0, b_B = 0: PIA(x̂) = x̂


def _attention_zeroed(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stock layer with its attention's output replaced by zeros."""
    layer.self_attn.forward = lambda *a, **k: (torch.zeros_like(k.get("hidden_states", a[0] if a else None)), None)
    try:
        out = layer(x, attention_mask=None, position_ids=None, position_embeddings=None)
    finally:
        del layer.self_attn.forward
    return out[0] if isinstance(out, tuple) else out


def _pre_fix_form(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the skipped layer computed before sandwich blocks were recognised: gain from
    post_attention_layernorm, no pre/post-feedforward norms."""
    return x + layer.mlp(layer.input_layernorm(x) * effective_gain(layer.post_attention_layernorm))


@pytest.mark.parametrize("name", ["llava", "paligemma", "gemma3", "llava-gemma2", "qwen3-vl", "glm4v"])
def test_skipped_form_is_the_attention_free_block(name: str) -> None:
    model, _ = build_family(name)
    perturb(model, seed=3, all_biases=True)
    decoder = locate_decoder(model)
    x = torch.randn(2, 5, decoder.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    for i, stock in enumerate(decoder.layers):
        layer = copy.deepcopy(stock)
        norm = layer.input_layernorm
        with torch.no_grad():  # identity input gain: x̂ = x / rms(x), as the FFN's own norm sees it
            norm.weight.copy_(norm.weight - effective_gain(norm) + 1.0)
            expected = _attention_zeroed(layer, x)
            skipped = SkippedLayer(layer, _pia(decoder.text_config.hidden_size), PoolingState(), i)
            got = skipped(x)
            pre_fix = _pre_fix_form(layer, x)
        assert (got - expected).abs().max() < 1e-5, f"{name} layer {i}"
        if decoder.forms[i].name.startswith("sandwich"):  # negative control: the pre-fix form is far off
            assert (pre_fix - expected).abs().max() > 1e-2, f"{name} layer {i}"


def _pia(hidden: int):
    from eas.model.adapters import PIA

    return PIA(hidden, IDENTITY_PIA).eval()


def _fold_gap(name: str) -> float:
    """Max abs difference between the folded and the adapter form of a converted family model."""
    model, processor = converted_family(name)
    batch = family_batch(processor)
    with torch.no_grad():
        before = model(**batch).logits
        fold_model(model)
        after = model(**batch).logits
    mask = batch["attention_mask"]
    return float((valid_logits(after, mask) - valid_logits(before, mask)).abs().max())


def test_adapters_are_not_trivial() -> None:
    """The exactness suite would prove nothing if the adapters did nothing."""
    model, processor = build_family("qwen2-vl")
    perturb(model, seed=5, all_biases=True)
    batch = family_batch(processor)
    with torch.no_grad():
        stock = model(**batch).logits
    model, _ = converted_family("qwen2-vl")
    with torch.no_grad():
        converted = model(**batch).logits
    assert (stock - converted).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["paligemma", "gemma3"])
def test_gemma_gain_rule_is_needed(name: str, monkeypatch) -> None:
    assert _fold_gap(name) <= 1e-5
    monkeypatch.setattr(fold_module, "effective_gain", lambda norm: norm.weight)  # rule dropped
    assert _fold_gap(name) > 1e-3


def test_qkv_bias_rule_is_needed(monkeypatch) -> None:
    assert _fold_gap("qwen2-vl") <= 1e-5
    original = fold_module.fold_kept
    monkeypatch.setattr(fold_module, "fold_kept", lambda W, b, *rest: original(W, None, *rest))  # bias dropped
    assert _fold_gap("qwen2-vl") > 1e-3


@pytest.mark.parametrize("name", ["gemma3", "llava-gemma2", "glm4v"])
def test_sandwich_output_norm_rule_is_needed(name: str, monkeypatch) -> None:
    assert _fold_gap(name) <= 1e-5
    monkeypatch.setattr(MergedSkippedLayer, "_ffn_out", lambda self, out: out)  # post_feedforward_layernorm dropped
    assert _fold_gap(name) > 1e-3


# --- refusals --------------------------------------------------------------------------------------------

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, pad_token_id=0)


def _llava_with(text: dict) -> nn.Module:
    return T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=dict(model_type="clip_vision_model", **CLIP),
                                                         text_config=text, image_token_id=3))


def _mllama() -> nn.Module:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=32, patch_size=8, vision_output_dim=64, intermediate_layers_indices=[0])
    config = T.MllamaConfig(text_config=dict(SMALL, cross_attention_layers=[1]), vision_config=vision)
    return T.MllamaForConditionalGeneration(config)


def _qwen3_vl_moe() -> nn.Module:
    text = dict(SMALL, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    return T.Qwen3VLMoeForConditionalGeneration(T.Qwen3VLMoeConfig(text_config=text, vision_config=vision))


def _llama4() -> nn.Module:
    text = dict(SMALL, intermediate_size_mlp=128, num_local_experts=2, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    return T.Llama4ForConditionalGeneration(T.Llama4Config(text_config=text, vision_config=vision))


def _aya_vision() -> nn.Module:
    config = T.AyaVisionConfig(text_config=dict(model_type="cohere2", **SMALL),
                               vision_config=dict(model_type="siglip_vision_model", **SIGLIP))
    return T.AyaVisionForConditionalGeneration(config)


def _fuyu() -> nn.Module:
    config = T.FuyuConfig(text_config=dict(model_type="persimmon", **SMALL), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, vocab_size=256, patch_size=8)
    return T.FuyuForCausalLM(config)


def _blip2_opt() -> nn.Module:
    text = dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=256, word_embed_proj_dim=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   encoder_hidden_size=32)
    config = T.Blip2Config(text_config=text, vision_config=vision, qformer_config=qformer, num_query_tokens=4)
    return T.Blip2ForConditionalGeneration(config)


def _lfm2_vl() -> nn.Module:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = T.Lfm2VlConfig(text_config=dict(SMALL, layer_types=["conv", "full_attention"]), vision_config=vision)
    return T.Lfm2VlForConditionalGeneration(config)


# family -> (tiny builder, a phrase the refusal must contain)
REFUSED = {
    "mllama": (_mllama, "cross-attention"),
    "qwen3-vl-moe": (_qwen3_vl_moe, "mixture of experts"),
    "llama4": (_llama4, "mixture of experts"),
    "aya-vision": (_aya_vision, "parallel attention/FFN"),
    "fuyu": (_fuyu, "not gated"),
    "blip2-opt": (_blip2_opt, "not gated"),
    "lfm2-vl": (_lfm2_vl, "no self-attention"),
    "llava-olmo2": (lambda: _llava_with(dict(model_type="olmo2", **SMALL)), "post-LN"),
    "llava-mixtral": (lambda: _llava_with(dict(model_type="mixtral", num_local_experts=2, **SMALL)),
                      "mixture of experts"),
    "llava-phi": (lambda: _llava_with(dict(model_type="phi", **SMALL)), "not gated"),
    # pre-norm with a fused gated FFN, but residual dropout modules no skipped form accounts for
    "llava-phi3": (lambda: _llava_with(dict(model_type="phi3", **SMALL)), "not accounted for"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_family_names_the_reason_and_is_left_untouched(name: str) -> None:
    build, reason = REFUSED[name]
    torch.manual_seed(0)
    model = build().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    with pytest.raises(UnsupportedModelError, match=reason):
        apply_plan(model, SkipPlan(skipped=(0,), num_layers=2))
    assert repr(model) == structure and getattr(model, "_eas_runtime", None) is None
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert not any("forward" in vars(m) for m in model.modules())  # the probe left nothing behind


def test_post_ln_refusal_reason_and_probe_catches_a_hidden_difference() -> None:
    """A block whose children look pre-norm but whose forward is not (the probe's job): the FFN reads the
    attention's input norm. Refused by the probe, model untouched."""
    model, _ = build_family("llava")
    layer = locate_decoder(model).layers[1]

    def parallel_forward(hidden_states, *args, **kwargs):
        x_hat = layer.input_layernorm(hidden_states)
        attn, _ = layer.self_attn(hidden_states=x_hat, **{k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hidden_states + attn + layer.mlp(x_hat)

    with torch.no_grad():
        layer.input_layernorm.weight.mul_(1.5)  # make the two norms differ
    layer.forward = parallel_forward
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"decoder layer 1 .*does not compute the pre-norm skipped block"):
        apply_plan(model, SkipPlan(skipped=(0,), num_layers=4))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
