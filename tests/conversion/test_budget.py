"""Budgets: by count, by fraction, by a target speedup through the measured cost model."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from eas.conversion.budget import Budget, CostModel, measure_cost, resolve_budget
from eas.conversion.data import load_dataset
from eas.zoo.llava import build_llava


def _cost(total: float = 1.0, attention: float = 0.02, layers: int = 32) -> CostModel:
    return CostModel(device="cpu", num_layers=layers, prompt_tokens=40, new_tokens=4, total_s=total,
                     attention_s=attention, ffn_s=0.01)


def test_exactly_one_budget() -> None:
    with pytest.raises(ValidationError):
        Budget()
    with pytest.raises(ValidationError):
        Budget(count=2, fraction=0.5)
    with pytest.raises(ValidationError):
        Budget(target_speedup=0.9)  # a slowdown is not a target


def test_count_and_fraction() -> None:
    assert resolve_budget(Budget(count=5), 32, 31, None).k == 5
    assert resolve_budget(Budget(fraction=0.5), 32, 31, None).k == 16
    assert resolve_budget(Budget(fraction=0.25), 4, 3, None).k == 1
    assert resolve_budget(Budget(fraction=0.75), 4, 3, None).k == 3
    decision = resolve_budget(Budget(fraction=0.5), 32, 31, _cost())
    assert decision.predicted_speedup == pytest.approx(1.0 / (1.0 - 16 * 0.02))
    with pytest.raises(ValueError, match="only 3 of the 4 layers are candidates"):
        resolve_budget(Budget(count=4), 4, 3, None)


def test_target_speedup_picks_the_smallest_sufficient_count() -> None:
    cost = _cost(total=1.0, attention=0.02)  # k layers -> 1 / (1 - 0.02 k)
    decision = resolve_budget(Budget(target_speedup=1.25), 32, 31, cost)
    assert decision.k == 10  # 1/(1-0.2) = 1.25 exactly; 9 gives 1.22
    assert decision.predicted_speedup >= 1.25 > cost.predicted_speedup(9)
    assert decision.basis == "target_speedup"


def test_unreachable_target_says_what_is_possible() -> None:
    with pytest.raises(ValueError, match=r"out of reach.*predicts 1\.06x"):
        resolve_budget(Budget(target_speedup=2.0), 4, 3, _cost(total=1.0, attention=0.02, layers=4))


def test_cost_model_is_measured_on_the_model(shapes_jsonl: Path) -> None:
    model, processor = build_llava(seed=0)
    sample = load_dataset(shapes_jsonl, val_size=4).validation[0]
    cost = measure_cost(model, processor, sample, new_tokens=2, repeats=2)
    assert cost.num_layers == 4 and cost.new_tokens == 2 and cost.prompt_tokens > 16
    assert 0 < cost.attention_share < 1 and cost.ffn_s > 0
    assert cost.predicted_speedup(2) > cost.predicted_speedup(1) > 1.0
    timed = [m for layer in model.model.language_model.layers for m in (layer.self_attn, layer.mlp)]
    assert not any(m._forward_pre_hooks for m in timed)  # the timing hooks are gone
