"""The default-model recipe on a tiny geometry: the loss falls, the output serves, stage 1 labels are right,
stage 2 leaves the vision tower alone."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eas.manifest import verify_manifest
from eas.model.loading import load_model
from eas.zoo.llava import TINY, build_llava
from eas_tools.demo.data import corpus
from eas_tools.demo.train import TrainConfig, train_default_model
from eas_tools.demo.vision_pretrain import COLORS, SHAPES, image_labels


def test_short_training_lowers_the_loss_and_saves_a_servable_model(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup=5, minutes=2, eval_every=1000, final_val_rows=32,
                      vision_steps=40)
    report = train_default_model(tmp_path / "m", cfg, geometry=TINY)
    assert report.steps == 30
    first, last = report.loss_curve[0], sum(report.loss_curve[-1:])
    assert last < 0.7 * first, report.loss_curve
    assert report.vision_loss_curve[-1] < report.vision_loss_curve[0], report.vision_loss_curve
    assert verify_manifest(tmp_path / "m", require=True)
    assert json.loads((tmp_path / "m" / "TRAINING.json").read_text())["steps"] == 30
    loaded = load_model(tmp_path / "m", device="cpu")
    from PIL import Image

    assert len(loaded.answer([Image.new("RGB", (64, 64), "red")], ["what color is the shape?"])) == 1


def _answer_from_labels(question: str, shape: str, color: str) -> str:
    """easy-vqa's question semantics, written independently of `image_labels`."""
    words = question.replace("?", "").split()
    if question.startswith(("what shape", "what is the")) and "color" not in words:
        return shape
    if "color" in words:
        return color
    mentioned = next(w for w in words if w in SHAPES or w in COLORS)
    present = mentioned in (shape, color)
    return "yes" if present != ("not" in words or "no" in words) else "no"


def test_stage_one_labels_agree_with_every_question_of_the_split() -> None:
    import easy_vqa

    questions, answers, ids = easy_vqa.get_train_questions()
    labels = image_labels(questions, answers, ids)
    assert len(labels) > 0.85 * len(set(ids))
    checked = 0
    for q, a, i in zip(questions, answers, ids, strict=True):
        if i in labels:
            shape, color = SHAPES[labels[i][0]], COLORS[labels[i][1]]
            assert _answer_from_labels(q, shape, color) == a, (q, a, shape, color)
            checked += 1
    assert checked > 30_000
    # negative control: a wrong colour contradicts some question about that image
    first = next(i for i in ids if i in labels)
    wrong = COLORS[(labels[first][1] + 1) % len(COLORS)]
    assert any(_answer_from_labels(q, SHAPES[labels[first][0]], wrong) != a
               for q, a, i in zip(questions, answers, ids, strict=True) if i == first)


def test_stage_two_trains_projector_and_decoder_only(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=5, batch_size=8, warmup=2, minutes=2, eval_every=1000, final_val_rows=8, vision_steps=0)
    train_default_model(tmp_path / "frozen", cfg, geometry=TINY)
    initial, _ = build_llava(TINY, seed=0, corpus=corpus())
    trained = load_model(tmp_path / "frozen", device="cpu").model
    for name, value in initial.model.vision_tower.state_dict().items():
        assert torch.equal(trained.model.vision_tower.state_dict()[name], value), name
    moved = [n for n, v in initial.model.multi_modal_projector.state_dict().items()
             if not torch.equal(trained.model.multi_modal_projector.state_dict()[n], v)]
    assert moved  # negative control: the projector did train
