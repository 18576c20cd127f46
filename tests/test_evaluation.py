"""The accuracy harness on a tiny model: counts, per-type breakdown, agreement."""

from __future__ import annotations

from pathlib import Path

import pytest

from eas.evaluation import agreement, evaluate, question_type
from eas.evaluation.harness import score
from eas.manifest import write_manifest
from eas.model.loading import load_model
from eas.zoo.llava import build_llava


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tiny")
    model, processor = build_llava(seed=0)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    write_manifest(directory)
    return load_model(directory, device="cpu")


@pytest.mark.parametrize("question,answer,kind", [
    ("what color is the shape?", "red", "color"),
    ("what is the blue shape?", "circle", "shape"),
    ("is there a red shape?", "no", "yes_no_color"),
    ("does the image contain a circle?", "yes", "yes_no_shape"),
    ("is there not a red shape in the image?", "yes", "negated_color"),
    ("is no triangle present?", "no", "negated_shape"),
])
def test_question_types(question: str, answer: str, kind: str) -> None:
    assert question_type(question, answer) == kind


def test_score_counts_exact_matches_per_type() -> None:
    report = score(["what color is the shape?", "is there a red shape?", "what shape is in the image?"],
                   ["red", "no", "circle"], [" Red.", "yes", "circle"], "test", 2.0)
    assert (report.correct, report.total) == (2, 3)
    assert report.per_type["yes_no_color"]["correct"] == 0 and report.per_type["color"]["correct"] == 1
    assert report.questions_per_s == 1.5


def test_evaluate_a_tiny_model(tiny) -> None:
    report = evaluate(tiny, limit=24, batch_size=8)
    assert report.total == 24 == len(report.answers)
    assert sum(row["total"] for row in report.per_type.values()) == 24
    assert sum(row["correct"] for row in report.per_type.values()) == report.correct
    assert 0.0 <= report.accuracy <= 1.0 and report.questions_per_s > 0


def test_agreement_with_itself_is_total(tiny, tmp_path: Path) -> None:
    result = agreement(tiny, tiny, limit=16, batch_size=8)
    assert result.agreement == 1.0 and result.identical == 16
    assert result.a.answers == result.b.answers
