"""A short run of the default-model recipe on a tiny geometry: the loss falls and the output serves."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eas.demo.train import TrainConfig, train_default_model
from eas.model.loading import load_model
from eas.model.manifest import verify_manifest
from eas.zoo.llava import TINY


def test_short_training_lowers_the_loss_and_saves_a_servable_model(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup=5, minutes=2, eval_every=1000, final_val_rows=32)
    report = train_default_model(tmp_path / "m", cfg, geometry=TINY)
    assert report.steps == 30
    first, last = report.loss_curve[0], sum(report.loss_curve[-1:])
    assert last < 0.7 * first, report.loss_curve
    assert verify_manifest(tmp_path / "m", require=True)
    assert json.loads((tmp_path / "m" / "TRAINING.json").read_text())["steps"] == 30
    loaded = load_model(tmp_path / "m", device="cpu")
    from PIL import Image

    assert len(loaded.answer([Image.new("RGB", (64, 64), "red")], ["what color is the shape?"])) == 1
