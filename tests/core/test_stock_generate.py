"""Plain `model.generate` on a converted model is exact (issue 15, item 2; eas/model/stock_generate.py).

The reference is the explicit path the project used before: the prompt mask set by hand for the whole
call (`prompt_context`) and a cache with a DummyLayer in every skipped slot, driving the *class's*
generate. Independent checks: each row of a left-padded batch equals that row alone, and the pooling
mask never grows. Negative controls: with the installed methods removed, the same comparisons fail.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from eas.model.adapters import AdapterConfig
from eas.model.cache import make_cache
from eas.model.convert import apply_plan, eas_runtime
from eas.model.fold import fold_model
from eas.model.generation import RowOptions, _Row, _RowSampler, generate
from eas.model.plan import SkipPlan
from eas.model.pooling import prompt_context
from eas.model.stock_generate import uninstall_generate
from eas.zoo.families import FAMILIES
from eas.zoo.qwen2vl import build_qwen2vl, qwen2vl_inputs
from tests.core.helpers import NONTRIVIAL, converted_llava, llava_batch, perturb
from tests.core.test_family_exactness import converted_family, family_batch

NEW = 8


def converted_qwen2vl(skipped=(0, 2)):
    model = build_qwen2vl()
    perturb(model, seed=5, all_biases=True)
    apply_plan(model, SkipPlan(skipped=tuple(skipped), num_layers=4), NONTRIVIAL)
    perturb(model, seed=6)
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 30, 220))]
    return model.eval(), qwen2vl_inputs(images, [[10, 11, 12, 13, 14, 15, 16], [20, 21]])


def family(name: str, skipped, merged: bool = False):
    if name == "llava":
        model, processor = converted_llava(skipped)
        batch = llava_batch(processor)
    else:
        model, batch = converted_qwen2vl(skipped)
    if merged:
        fold_model(model)
    assert (batch["attention_mask"] == 0).any()  # left padding really present
    return model, batch


def reference(model, batch, **kwargs):
    """The explicit path: hand-set prompt mask, DummyLayer cache, the class's own generate."""
    runtime = eas_runtime(model)
    cache = make_cache(model, runtime.plan.skipped) if kwargs.get("use_cache", True) else None
    with prompt_context(runtime.state, batch["attention_mask"]):
        return type(model).generate(model, **batch, max_new_tokens=NEW, past_key_values=cache,
                                    output_logits=True, return_dict_in_generate=True, **kwargs)


def stock(model, batch, **kwargs):
    return model.generate(**batch, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True, **kwargs)


def logit_gap(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("skipped", [(0, 2), (1, 3)])
@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_stock_greedy_equals_reference(name: str, skipped, use_cache: bool) -> None:
    model, batch = family(name, skipped, merged=skipped == (1, 3))
    ref = reference(model, batch, do_sample=False, use_cache=use_cache)
    out = stock(model, batch, do_sample=False, use_cache=use_cache)
    assert torch.equal(out.sequences, ref.sequences)
    assert logit_gap(out, ref) <= 1e-5
    # The project's path is model.generate: same ids.
    assert torch.equal(generate(model, batch, max_new_tokens=NEW, use_cache=use_cache), ref.sequences)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_stock_sampling_with_a_seed_equals_reference(name: str, use_cache: bool) -> None:
    model, batch = family(name, (0, 2))
    options = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0, use_cache=use_cache)
    torch.manual_seed(3)
    ref = reference(model, batch, **options)
    torch.manual_seed(3)
    out = stock(model, batch, **options)
    assert torch.equal(out.sequences, ref.sequences)
    assert logit_gap(out, ref) <= 1e-5
    greedy = stock(model, batch, do_sample=False)
    assert not torch.equal(out.sequences, greedy.sequences)  # it really sampled


@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_project_sampler_equals_reference_with_the_same_sampler(name: str) -> None:
    model, batch = family(name, (0, 2))
    rows = [RowOptions(do_sample=True, temperature=0.8, top_p=0.95, seed=s) for s in (11, 12)]
    ours = generate(model, batch, max_new_tokens=NEW, rows=rows)
    sampler = _RowSampler([_Row(o, NEW) for o in rows])
    ref = reference(model, batch, do_sample=False, logits_processor=[sampler])
    assert torch.equal(ours, ref.sequences)


@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_each_row_of_a_left_padded_batch_equals_the_row_alone(name: str) -> None:
    model, batch = family(name, (0, 2))
    together = stock(model, batch, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        alone_batch = {k: v for k, v in batch.items()}
        alone_batch["input_ids"] = batch["input_ids"][i][keep][None]
        alone_batch["attention_mask"] = batch["attention_mask"][i][keep][None]
        if name == "llava":
            alone_batch["pixel_values"] = batch["pixel_values"][i: i + 1]
        else:
            alone_batch["mm_token_type_ids"] = batch["mm_token_type_ids"][i][keep][None]
            patches = int(batch["image_grid_thw"][i].prod())
            start = int(batch["image_grid_thw"][:i].prod(dim=1).sum())
            alone_batch["pixel_values"] = batch["pixel_values"][start: start + patches]
            alone_batch["image_grid_thw"] = batch["image_grid_thw"][i: i + 1]
        alone = stock(model, alone_batch, do_sample=False)
        assert torch.equal(together.sequences[i, width:], alone.sequences[0, int(keep.sum()):])
        gap = max((a[i] - b[0]).abs().max().item() for a, b in zip(together.logits, alone.logits, strict=True))
        assert gap <= 1e-5


def test_pooling_mask_stays_the_prompt_without_cache() -> None:
    """The reported bug: with use_cache=False the mask grew by the generated tokens (11 -> 18 columns)."""
    model, batch = family("llava", (1, 3))
    state = eas_runtime(model).state
    widths: list[int] = []
    model.register_forward_hook(lambda *_: widths.append(state.prompt_mask.shape[1]))
    model.generate(**batch, max_new_tokens=NEW, do_sample=False, use_cache=False)
    assert widths == [batch["input_ids"].shape[1]] * NEW


@pytest.mark.parametrize("case", ["no-cache", "layer0-cache"])
def test_negative_control_stock_methods_are_wrong(case: str) -> None:
    skipped = (1, 3) if case == "no-cache" else (0, 2)
    model, batch = family("llava", skipped)
    use_cache = case == "layer0-cache"
    ref = reference(model, batch, do_sample=False, use_cache=use_cache)
    uninstall_generate(model)
    out = stock(model, batch, do_sample=False, use_cache=use_cache)
    assert logit_gap(out, ref) > 1e-3


@pytest.mark.parametrize("skipped", [(0, 2), (1, 3)])
def test_beam_search_is_exact(skipped) -> None:
    model, batch = family("llava", skipped)
    beams = dict(num_beams=3, do_sample=False, max_new_tokens=6)
    cached = model.generate(**batch, **beams)
    assert torch.equal(model.generate(**batch, use_cache=False, **beams), cached)
    assert torch.equal(generate(model, batch, **beams), cached)
    width = batch["input_ids"].shape[1]
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        alone = model.generate(input_ids=batch["input_ids"][i][keep][None],
                               attention_mask=batch["attention_mask"][i][keep][None],
                               pixel_values=batch["pixel_values"][i: i + 1], **beams)
        n = int(keep.sum())
        assert torch.equal(cached[i, width:width + alone.shape[1] - n], alone[0, n:])


@pytest.mark.parametrize("option", [dict(prefill_chunk_size=4), dict(cache_implementation="static")])
def test_options_that_cannot_be_exact_are_refused(option) -> None:
    model, batch = family("llava", (0, 2))
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        model.generate(**batch, max_new_tokens=2, **option)


def test_routed_adapters_generate_exactly_too() -> None:
    """Per-sample routing weights (router=True) are pooled statistics as well."""
    from eas.zoo.llava import build_llava

    model, processor = build_llava(seed=2)
    apply_plan(model, SkipPlan(skipped=(0, 2), num_layers=4),
               AdapterConfig(pia_rank=16, kept_rank=8, up_init="xavier", dropout=0.0, router=True))
    perturb(model.eval(), seed=9)
    batch = llava_batch(processor)
    ref = reference(model, batch, do_sample=False, use_cache=False)
    assert torch.equal(stock(model, batch, do_sample=False, use_cache=False).sequences, ref.sequences)


def test_a_static_cache_named_only_by_the_generation_config_gives_way() -> None:
    """Gemma 3 checkpoints ship cache_implementation="hybrid": generate still works, exactly."""
    model, batch = family("llava", (0, 2))
    ref = reference(model, batch, do_sample=False)
    model.generation_config.cache_implementation = "static"
    out = stock(model, batch, do_sample=False)
    assert torch.equal(out.sequences, ref.sequences) and logit_gap(out, ref) <= 1e-5


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def any_family(request):
    model, processor = converted_family(request.param)
    fold_model(model)
    return request.param, model, processor, family_batch(processor)


def test_every_supported_family_generates_exactly_through_stock_generate(any_family) -> None:
    """Layer 0 skipped, left-padded, cache on and off: plain generate equals the explicit path."""
    name, model, _, batch = any_family
    # A random tiny model may emit the image token, which a cache-free step then counts as an image placeholder
    # without features (transformers' own limit, converted or not): never let it be generated.
    image_token = [getattr(model.config, "image_token_id", None) or model.config.image_token_index]
    for use_cache in (True, False):
        ref = reference(model, batch, do_sample=False, use_cache=use_cache, suppress_tokens=image_token)
        out = stock(model, batch, do_sample=False, use_cache=use_cache, suppress_tokens=image_token)
        assert torch.equal(out.sequences, ref.sequences), (name, use_cache)
        assert logit_gap(out, ref) <= 1e-5, (name, use_cache)
