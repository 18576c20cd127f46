"""Stage-2 training: the loss goes down, only adapter parameters move, runs are seeded, cancel stops it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from eas.conversion.data import load_dataset
from eas.conversion.errors import Cancelled
from eas.conversion.training import TrainingConfig, build_optimizer, lr_at, mean_loss, scaled_lr, train_plan
from eas.model.adapters import AdapterConfig
from eas.model.plan import SkipPlan
from eas.zoo.llava import build_llava

PLAN = SkipPlan(skipped=(1, 3), num_layers=4)


def _train(jsonl: Path, steps: int = 25, seed: int = 0, cancel: threading.Event | None = None):
    model, processor = build_llava(seed=0)
    data = load_dataset(jsonl, val_size=8)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainingConfig(steps=steps, batch_size=8, lr=1e-2, seed=seed)
    report = train_plan(model, processor, PLAN, AdapterConfig(), data.train, data.validation, cfg,
                        cancel=cancel, show_bar=False)
    return model, processor, data, base, report


def test_few_steps_lower_the_loss_and_touch_only_adapters(shapes_jsonl: Path) -> None:
    model, processor, data, base, report = _train(shapes_jsonl)
    assert len(report.curve.loss) == 25 and len(report.curve.lr) == 25 and report.curve.epoch_loss
    assert report.val_loss_after < report.val_loss_before
    assert mean_loss(model, processor, data.train) < report.val_loss_before
    assert sum(report.curve.loss[-5:]) < sum(report.curve.loss[:5])
    state = model.state_dict()
    changed = {k for k in state if k in base and not torch.equal(state[k], base[k])}
    assert changed == set()  # every source tensor that still exists is bit-identical
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".pia." in n or ".adapter." in n for n in trainable)
    removed = {k for k in base if k not in state}
    skipped_attention = {k for k in base
                         if "language_model" in k and any(f"layers.{i}.self_attn." in k for i in (1, 3))}
    wrapped_norms = {f"model.language_model.layers.{i}.input_layernorm.weight" for i in (0, 2)}  # AdaptedNorm
    assert removed == skipped_attention | wrapped_norms
    for key in wrapped_norms:
        assert torch.equal(state[key.replace("input_layernorm.", "input_layernorm.norm.")], base[key])


def test_training_is_deterministic_for_a_seed(shapes_jsonl: Path) -> None:
    first = _train(shapes_jsonl, steps=4)[4].curve.loss
    second = _train(shapes_jsonl, steps=4)[4].curve.loss
    other = _train(shapes_jsonl, steps=4, seed=1)[4].curve.loss
    assert first == second and first != other


def test_cancel_stops_training(shapes_jsonl: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        _train(shapes_jsonl, cancel=cancel)


def test_schedule_and_optimizer_groups() -> None:
    assert scaled_lr(32) == pytest.approx(1.125e-3)  # the reference's 9e-3 · 32 / 256
    peak, total = 1.0, 100
    assert lr_at(0, total, peak, 0.1) == pytest.approx(0.1)  # linear warm-up over 10 steps
    assert lr_at(9, total, peak, 0.1) == pytest.approx(1.0)
    assert lr_at(10, total, peak, 0.1) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(55, total, peak, 0.1) == pytest.approx(0.5)
    assert lr_at(99, total, peak, 0.1) < 0.001
    weight = torch.nn.Parameter(torch.zeros(3, 3))
    bias = torch.nn.Parameter(torch.zeros(3))
    gain = torch.nn.Parameter(torch.zeros(3, 3))
    opt = build_optimizer([("a.weight", weight), ("a.bias", bias), ("x.norm.weight", gain)],
                          TrainingConfig(steps=1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.02 and decay["params"] == [weight]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2
    assert opt.defaults["betas"] == (0.9, 0.95)
