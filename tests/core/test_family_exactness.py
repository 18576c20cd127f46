"""Exactness of the conversion on every supported family (eas/zoo/families.py), images included.

Each family's tiny model gets every norm gain and every bias randomised before conversion and every
adapter tensor randomised after it (xavier up-projections, perturbed biases), so no formula can pass by
sitting at identity. Layer 0 is skipped (the case that breaks the default KV cache). Checked, ≤ 1e-5 max
abs on logits and equal ids: folded vs adapter form, one sample in a left-padded batch vs alone, cached vs
cache-free generation, save → load. docs/eas-core.md, "Supported families".
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from eas.model.convert import apply_plan, eas_runtime
from eas.model.fold import fold_model
from eas.model.generation import generate
from eas.model.persistence import load_converted, save_converted
from eas.model.plan import SkipPlan
from eas.model.prompting import build_prompt
from eas.zoo.families import FAMILIES, build_family
from tests.core.helpers import NONTRIVIAL, perturb

TOL = 1e-5
SKIPPED = (0, 2)
QUESTIONS = ["what colour is the circle?", "is there a big red square in the picture, and is it blue?"]


def family_images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 36), "red"), Image.new("RGB", (47, 36), "blue")]


def family_batch(processor, questions=QUESTIONS, images=None):
    """A left-padded batch, one image per sample (nested: Gemma3's processor needs it, the others accept it)."""
    images = images if images is not None else family_images()[: len(questions)]
    prompts = [build_prompt(processor, q) for q in questions]
    return processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True)


def converted_family(name: str, seed: int = 0):
    """(adapter-form model, processor): norms and biases randomised, then the plan, then the adapters."""
    model, processor = build_family(name, seed=seed)
    perturb(model, seed=seed + 5, all_biases=True)
    apply_plan(model, SkipPlan(skipped=SKIPPED, num_layers=4), NONTRIVIAL)
    perturb(model, seed=seed + 6)
    return model.eval(), processor


def valid_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[mask.bool()]


@dataclass
class Case:
    name: str
    model: torch.nn.Module  # folded
    processor: object
    batch: dict
    adapter_logits: torch.Tensor


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request) -> Case:
    name = request.param
    model, processor = converted_family(name)
    batch = family_batch(processor)
    with torch.no_grad():
        adapter_logits = model(**batch).logits
        fold_model(model)
    return Case(name, model, processor, batch, adapter_logits)


def test_folded_equals_adapter_form(case: Case) -> None:
    with torch.no_grad():
        folded = case.model(**case.batch).logits
    mask = case.batch["attention_mask"]
    diff = (valid_logits(folded, mask) - valid_logits(case.adapter_logits, mask)).abs().max()
    assert diff <= TOL, f"{case.name}: folded vs adapter form differ by {diff:.2e}"


def test_batch_equals_alone(case: Case) -> None:
    with torch.no_grad():
        batched = case.model(**case.batch).logits
        for i, (question, image) in enumerate(zip(QUESTIONS, family_images(), strict=True)):
            alone_batch = family_batch(case.processor, [question], [image])
            alone = case.model(**alone_batch).logits[0]
            n = alone.shape[0]
            diff = (batched[i, -n:] - alone).abs().max()
            assert diff <= TOL, f"{case.name}: sample {i} in a left-padded batch vs alone differs by {diff:.2e}"


def _generate(model, batch, **kwargs):
    out = generate(model, batch, max_new_tokens=5, return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def test_cache_equals_no_cache(case: Case) -> None:
    ids_cached, logits_cached = _generate(case.model, case.batch, use_cache=True)
    ids_plain, logits_plain = _generate(case.model, case.batch, use_cache=False)
    assert torch.equal(ids_cached, ids_plain), case.name
    assert (logits_cached - logits_plain).abs().max() <= TOL, case.name


def test_save_load_round_trip(case: Case, tmp_path) -> None:
    processor = case.processor if hasattr(case.processor, "save_pretrained") else None
    save_converted(case.model, tmp_path / case.name, processor)
    loaded, plan = load_converted(tmp_path / case.name)
    assert plan.skipped == SKIPPED and eas_runtime(loaded).merged
    with torch.no_grad():
        before = case.model(**case.batch).logits
        after = loaded(**case.batch).logits
    mask = case.batch["attention_mask"]
    assert (valid_logits(before, mask) - valid_logits(after, mask)).abs().max() <= TOL, case.name
    ids_before, _ = _generate(case.model, case.batch)
    ids_after, _ = _generate(loaded, case.batch)
    assert torch.equal(ids_before, ids_after), case.name
