"""Evaluate a model on easy-vqa: exact match overall and per question type, throughput, agreement.

Question types are read off the question and its gold answer:

| type | example | answer |
|---|---|---|
| `color` | what color is the shape? | one of 8 colours |
| `shape` | what shape is in the image? / what is the blue shape? | circle, rectangle, triangle |
| `yes_no_color` | is there a red shape? | yes / no |
| `yes_no_shape` | does the image contain a circle? | yes / no |
| `negated_color`, `negated_shape` | is there not a red shape? / does the image not contain a circle? | yes / no |

Answers are compared after stripping spaces and a trailing full stop, case-insensitively. Greedy
decoding through `LoadedModel.answer`, exactly as the service answers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from PIL import Image
from tqdm import tqdm

from eas.model.loading import LoadedModel

SHAPES = ("circle", "rectangle", "triangle")


def normalise(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def question_type(question: str, answer: str) -> str:
    q = f" {question.lower()} "
    if answer not in ("yes", "no"):
        return "shape" if answer in SHAPES else "color"
    about = "shape" if any(f" {s}" in q for s in SHAPES) else "color"
    negated = " not " in q or " no " in q
    return f"{'negated' if negated else 'yes_no'}_{about}"


@dataclass
class EvalReport:
    split: str
    total: int
    correct: int
    accuracy: float
    per_type: dict[str, dict[str, float]]
    seconds: float
    questions_per_s: float
    answers: list[str] = field(repr=False, default_factory=list)

    def to_dict(self, with_answers: bool = False) -> dict:
        data = asdict(self)
        if not with_answers:
            data.pop("answers")
        return data


def load_split(split: str = "test", limit: int | None = None) -> tuple[list[str], list[str], list[str]]:
    """(questions, answers, image paths) of an easy-vqa split, in the package's order."""
    import easy_vqa

    if split == "test":
        questions, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    elif split == "train":
        questions, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        raise ValueError(f"unknown split {split!r}: use 'test' or 'train'")
    n = len(questions) if limit is None else min(limit, len(questions))
    return list(questions[:n]), list(answers[:n]), [paths[i] for i in ids[:n]]


def _answer_all(model: LoadedModel, questions: Sequence[str], paths: Sequence[str], batch_size: int,
                max_new_tokens: int, desc: str) -> tuple[list[str], float]:
    out: list[str] = []
    started = time.perf_counter()
    for first in tqdm(range(0, len(questions), batch_size), desc=desc, unit="batch", leave=False):
        chunk = slice(first, first + batch_size)
        images = [Image.open(p).convert("RGB") for p in paths[chunk]]
        out += model.answer(images, list(questions[chunk]), max_new_tokens=max_new_tokens)
    return out, time.perf_counter() - started


def score(questions: Sequence[str], gold: Sequence[str], predicted: Sequence[str], split: str,
          seconds: float) -> EvalReport:
    totals, hits = Counter(), Counter()
    for q, a, p in zip(questions, gold, predicted, strict=True):
        kind = question_type(q, a)
        totals[kind] += 1
        hits[kind] += normalise(p) == normalise(a)
    correct = sum(hits.values())
    total = len(gold)
    per_type = {k: {"total": totals[k], "correct": hits[k], "accuracy": hits[k] / totals[k]} for k in sorted(totals)}
    return EvalReport(split=split, total=total, correct=correct, accuracy=correct / max(total, 1),
                      per_type=per_type, seconds=round(seconds, 3),
                      questions_per_s=round(total / seconds, 2) if seconds > 0 else 0.0, answers=list(predicted))


def evaluate(model: LoadedModel, split: str = "test", limit: int | None = None, batch_size: int = 64,
             max_new_tokens: int = 4) -> EvalReport:
    """Exact-match accuracy of `model` on easy-vqa `split` (the first `limit` questions; None = all)."""
    questions, gold, paths = load_split(split, limit)
    predicted, seconds = _answer_all(model, questions, paths, batch_size, max_new_tokens, f"eval {model.name}")
    return score(questions, gold, predicted, split, seconds)


@dataclass
class Agreement:
    total: int
    identical: int
    agreement: float
    a: EvalReport
    b: EvalReport

    def to_dict(self) -> dict:
        return {"total": self.total, "identical": self.identical, "agreement": self.agreement,
                "a": self.a.to_dict(), "b": self.b.to_dict()}


def agreement(a: LoadedModel, b: LoadedModel, split: str = "test", limit: int | None = None,
              batch_size: int = 64) -> Agreement:
    """How often two models give the same (normalised) answer, with both accuracies."""
    report_a = evaluate(a, split, limit, batch_size)
    report_b = evaluate(b, split, limit, batch_size)
    same = sum(normalise(x) == normalise(y) for x, y in zip(report_a.answers, report_b.answers, strict=True))
    return Agreement(total=report_a.total, identical=same, agreement=same / max(report_a.total, 1),
                     a=report_a, b=report_b)
