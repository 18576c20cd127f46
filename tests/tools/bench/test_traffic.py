"""Bytes read per decode step (eas_tools/bench/traffic.py), checked against what a real decode step touches:
the parameters its operations receive (recorded with a dispatch mode) and the cache's own size."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eas.model.adapters import AdapterConfig
from eas.model.cache import kv_cache_bytes, make_cache
from eas.model.convert import apply_plan
from eas.model.fold import fold_model
from eas.model.generation import generate
from eas.model.loading import LoadedModel
from eas.model.plan import SkipPlan
from eas.model.pooling import prompt_context
from eas.zoo.llava import TINY, build_llava
from eas_tools.bench.traffic import bytes_ratio, count_decode_bytes, decode_weight_bytes
from tests.core.helpers import images


class StoragesRead(TorchDispatchMode):
    """The storages of every tensor an operation receives; an embedding lookup reads only its rows."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()
        self.embedding_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.ops.aten.embedding.default:
            weight, indices = args[0], args[1]
            self.embedding_rows += indices.numel() * weight.shape[-1] * weight.element_size()
        else:
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor):
                    self.storages.add(value.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def _converted(skipped: tuple[int, ...]) -> tuple[torch.nn.Module, LoadedModel]:
    model, processor = build_llava(TINY, seed=0)
    if skipped:
        apply_plan(model, SkipPlan(skipped=skipped, num_layers=4), AdapterConfig())
        fold_model(model)
    return model, LoadedModel(model=model, processor=processor)


def _one_decode_step_reads(model: torch.nn.Module, loaded: LoadedModel, skipped: tuple[int, ...]) -> int:
    batch = loaded.prepare(images(1), ["what colour is the circle?"])
    cache = make_cache(model, skipped)
    runtime = getattr(model, "_eas_runtime", None)
    with torch.inference_mode():
        context = prompt_context(runtime.state, batch["attention_mask"]) if runtime else contextlib.nullcontext()
        with context:
            model(**batch, past_key_values=cache, use_cache=True, logits_to_keep=1)
            mask = torch.cat([batch["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
            with StoragesRead() as reads:
                model(input_ids=torch.tensor([[5]]), attention_mask=mask, past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
    seen: set[int] = set()
    total = reads.embedding_rows
    for p in model.parameters():
        ptr = p.untyped_storage().data_ptr()
        if ptr in reads.storages and ptr not in seen:
            seen.add(ptr)
            total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("skipped", [(), (1, 3)])
def test_weight_bytes_are_the_parameters_a_real_decode_step_reads(skipped: tuple[int, ...]) -> None:
    model, loaded = _converted(skipped)
    assert decode_weight_bytes(model) == _one_decode_step_reads(model, loaded, skipped)


def test_the_count_would_catch_the_vision_tower_or_a_whole_embedding_table() -> None:
    """Negative control: the measurement tells apart counts that are off by the parts a step does not read."""
    model, loaded = _converted(())
    read = _one_decode_step_reads(model, loaded, ())
    vision = sum(p.numel() * p.element_size() for p in model.model.vision_tower.parameters())
    table = model.get_input_embeddings().weight
    assert read != decode_weight_bytes(model) + vision
    assert read != decode_weight_bytes(model) + table.numel() * table.element_size() - table.shape[-1] * 4


@pytest.mark.parametrize("skipped", [(), (2, 3)])
def test_kv_bytes_are_the_mean_cache_size_over_the_decode_steps(skipped: tuple[int, ...]) -> None:
    """Step k reads a cache of prompt + k positions (+ its own): the cache a generation of k + 1 tokens leaves."""
    model, loaded = _converted(skipped)
    batch = loaded.prepare(images(1), ["what colour is the circle?"])
    prompt = batch["input_ids"].shape[1]
    sizes = []
    for new in range(2, 6):  # the caches steps 1..4 read
        cache = make_cache(model, skipped)
        with torch.inference_mode():
            out = generate(model, batch, max_new_tokens=new, past_key_values=cache)
        assert out.shape[1] - prompt == new or out.shape[1] == new  # generation ran to its length
        sizes.append(kv_cache_bytes(cache))
    counted = count_decode_bytes(model, prompt, new_tokens=5, skipped=skipped)
    assert counted.decode_steps == 4
    assert counted.kv_cache == pytest.approx(sum(sizes) / len(sizes), rel=1e-12)
    assert counted.attention_layers == 4 - len(skipped)


def test_ratio_is_one_without_skipping_and_grows_with_it() -> None:
    base, _ = _converted(())
    one, _ = _converted((3,))
    two, _ = _converted((2, 3))
    counts = [count_decode_bytes(base, 27, 8), count_decode_bytes(one, 27, 8, (3,)),
              count_decode_bytes(two, 27, 8, (2, 3))]
    assert bytes_ratio(counts[0], counts[0]) == 1.0
    assert 1.0 < bytes_ratio(counts[0], counts[1]) < bytes_ratio(counts[0], counts[2])
    assert counts[2].kv_cache == pytest.approx(counts[0].kv_cache / 2)
