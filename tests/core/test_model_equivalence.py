"""Whole-model exactness on tiny LLaVA and Qwen2-VL: adapter form vs folded form, cached decoding,
batch invariance with padding (layer 0 skipped too), identity init, gradient scope, KV bytes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from eas.model.adapters import AdapterConfig
from eas.model.cache import kv_cache_bytes, make_cache
from eas.model.convert import apply_plan, eas_runtime
from eas.model.fold import fold_model
from eas.model.generation import generate
from eas.model.plan import SkipPlan
from eas.zoo.llava import build_llava
from eas.zoo.qwen2vl import build_qwen2vl, qwen2vl_inputs
from tests.core.helpers import NONTRIVIAL, converted_llava, llava_batch, perturb, select


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("skipped", [(1, 3), (0, 2)])
def test_llava_merged_matches_unmerged(skipped) -> None:
    model, processor = converted_llava(skipped)
    batch = llava_batch(processor)
    before = _logits(model, batch)
    ids_before = generate(model, batch, max_new_tokens=16)
    fold_model(model)
    after = _logits(model, batch)
    mask = batch["attention_mask"].bool()
    assert (after - before)[mask].abs().max() < 1e-4
    assert torch.equal(generate(model, batch, max_new_tokens=16), ids_before)
    assert ids_before.shape[1] == batch["input_ids"].shape[1] + 16  # really decoded 16 tokens


def test_adapters_change_the_model() -> None:
    """Guard for the tests above: the converted model is not accidentally the base model."""
    base, processor = build_llava()
    model, _ = converted_llava((1, 3))
    batch = llava_batch(processor)
    assert (_logits(model, batch) - _logits(base, batch)).abs().max() > 1e-2


def test_qwen2vl_merged_matches_unmerged() -> None:
    model = build_qwen2vl()
    perturb(model, seed=5)
    apply_plan(model, SkipPlan(skipped=(0, 2), num_layers=4), NONTRIVIAL)
    perturb(model, seed=6)
    images = [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")]
    batch = qwen2vl_inputs(images, [[10, 11, 12, 13, 14, 15, 16], [20, 21]])
    before = _logits(model, batch)
    ids_before = generate(model, batch, max_new_tokens=16)
    fold_model(model)
    assert model.model.language_model.layers[1].self_attn.q_proj.bias is not None
    mask = batch["attention_mask"].bool()
    assert (_logits(model, batch) - before)[mask].abs().max() < 1e-4
    assert torch.equal(generate(model, batch, max_new_tokens=16), ids_before)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("skipped", [(0, 2), (1, 3)])
def test_cached_decoding_equals_cache_free(skipped, merged: bool) -> None:
    model, processor = converted_llava(skipped)
    if merged:
        fold_model(model)
    batch = llava_batch(processor)
    cached = generate(model, batch, max_new_tokens=16, output_scores=True, return_dict_in_generate=True)
    free = generate(model, batch, max_new_tokens=16, use_cache=False, output_scores=True,
                    return_dict_in_generate=True)
    assert torch.equal(cached.sequences, free.sequences)
    for a, b in zip(cached.scores, free.scores, strict=True):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("skipped", [(0, 2), (1, 3)])
def test_batch_invariance_left_padding(skipped, merged: bool) -> None:
    model, processor = converted_llava(skipped)
    if merged:
        fold_model(model)
    batch = llava_batch(processor)
    assert (batch["attention_mask"] == 0).any()  # the prompts really differ in length
    together = _logits(model, batch)
    together_ids = generate(model, batch, max_new_tokens=8)
    width = batch["input_ids"].shape[1]
    for i in range(2):
        alone_batch = select(batch, i)
        alone = _logits(model, alone_batch)
        keep = batch["attention_mask"][i].bool()
        assert (together[i][keep] - alone[0]).abs().max() < 1e-5
        alone_ids = generate(model, alone_batch, max_new_tokens=8)
        assert torch.equal(together_ids[i, width:], alone_ids[0, alone_batch["input_ids"].shape[1]:])


def test_batch_invariance_right_padding_training() -> None:
    """Training batches are right padded and carry labels; pooling must ignore padding and answers."""
    model, processor = converted_llava((0, 2))
    batch = llava_batch(processor, padding_side="right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    lengths = batch["attention_mask"].sum(1)
    for i in range(2):  # supervise the last 3 real tokens of each sample
        labels[i, : lengths[i] - 3] = -100
    batch["labels"] = labels
    with torch.no_grad():
        together = model(**batch).logits
        for i in range(2):
            n = int(lengths[i])
            alone = model(
                input_ids=batch["input_ids"][i : i + 1, :n],
                attention_mask=batch["attention_mask"][i : i + 1, :n],
                pixel_values=batch["pixel_values"][i : i + 1],
                labels=labels[i : i + 1, :n],
            ).logits
            assert (together[i, :n] - alone[0]).abs().max() < 1e-5


def test_pooled_stats_ignore_padding_answers_and_generated_tokens() -> None:
    model, processor = converted_llava((0, 2))
    state = eas_runtime(model).state
    batch = llava_batch(processor)

    def stats():
        frozen = state._frozen.items()
        return {k: (v[0].clone() if isinstance(v, tuple) else v) for k, v in frozen if k.startswith("layer")}

    _logits(model, batch)
    reference = stats()
    # different pad token contents
    noisy = dict(batch)
    noisy["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 77)
    _logits(model, noisy)
    assert all(torch.equal(reference[k], v) for k, v in stats().items())
    # answer tokens (labels) appended: pooling stops before the first supervised token
    answers = torch.tensor([[50, 51, 52]] * 2)
    train = {
        "input_ids": torch.cat([batch["input_ids"], answers], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(answers)], 1),
        "pixel_values": batch["pixel_values"],
    }
    train["labels"] = torch.cat([torch.full_like(batch["input_ids"], -100), answers], 1)
    with torch.no_grad():
        model(**train)
    first = stats()
    train["input_ids"][:, -3:] = 99
    train["labels"][:, -3:] = 99
    with torch.no_grad():
        model(**train)
    second = stats()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for k in first:  # same prompt => same p as the inference prefill (up to causal padding effects)
        assert (first[k] - reference[k]).abs().max() < 1e-5
    # generated tokens: after decoding, the frozen stats are still the prefill ones
    generate(model, batch, max_new_tokens=6)
    assert all((v - reference[k]).abs().max() < 1e-5 for k, v in stats().items())


def test_identity_init_without_skips_reproduces_base_exactly() -> None:
    base, processor = build_llava()
    model, _ = build_llava()
    apply_plan(model, SkipPlan(skipped=(), num_layers=4), AdapterConfig(dropout=0.0))
    batch = llava_batch(processor)
    assert torch.equal(_logits(model.eval(), batch), _logits(base, batch))


def test_only_adapters_receive_gradients() -> None:
    model, processor = build_llava()
    apply_plan(model, SkipPlan(skipped=(1, 3), num_layers=4), AdapterConfig(up_init="xavier"))
    model.train()
    batch = llava_batch(processor)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-4] = -100
    model(**batch, labels=labels).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad, "no gradient reached the adapters"
    assert all(".pia." in n or ".adapter." in n for n in with_grad), sorted(with_grad)[:5]
    assert any(".pia." in n for n in with_grad) and any(".adapter." in n for n in with_grad)
    layers = model.model.language_model.layers
    assert not hasattr(layers[1], "self_attn") and not hasattr(layers[3], "self_attn")
    assert not any("language_model.layers.1.self_attn" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("skipped", [(1, 3), (0,), (0, 1, 3)])
def test_kv_cache_shrinks_by_skipped_fraction(skipped) -> None:
    base, processor = build_llava()
    model, _ = converted_llava(skipped)
    batch = llava_batch(processor)
    sizes = []
    for m, skip in ((base, ()), (model, skipped)):
        cache = make_cache(m, skip)
        with torch.no_grad():
            m(**batch, past_key_values=cache, use_cache=True)
        sizes.append(kv_cache_bytes(cache))
        assert cache.get_seq_length() == batch["input_ids"].shape[1]
    assert sizes[0] > 0
    assert sizes[1] * 4 == sizes[0] * (4 - len(skipped))
