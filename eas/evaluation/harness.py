"""Evaluate a model on easy-vqa or a JSONL dataset: exact match overall (and per question type on
easy-vqa), throughput, agreement.

The dataset is `easy-vqa` (its `test` or `train` split) or a JSONL file of `{image, question, answer}`
rows, read by the same loader `eas convert` uses (`eas.conversion.data.read_jsonl`: bad rows are skipped
and reported, a file without a usable row is refused with `DatasetError`). A JSONL file has no split and
no question types, so its report has `split` and `per_type` set to None.

Question types of easy-vqa are read off the question and its gold answer:

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
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from eas.conversion.data import EASY_VQA, RowError, read_jsonl
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
    split: str | None  # None for a JSONL dataset
    total: int
    correct: int
    accuracy: float
    per_type: dict[str, dict[str, float]] | None  # None where the dataset has no question types
    seconds: float
    questions_per_s: float
    answers: list[str] = field(repr=False, default_factory=list)
    dataset: str = EASY_VQA
    skipped_rows: int = 0  # unusable JSONL rows left out

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


@dataclass(frozen=True)
class EvalSet:
    """The questions an evaluation asks, in order."""

    dataset: str
    split: str | None
    questions: list[str]
    answers: list[str]
    image_paths: list[str]
    typed: bool  # whether question_type applies (easy-vqa)
    skipped: tuple[RowError, ...] = ()


def load_eval_set(dataset: str | Path = EASY_VQA, split: str = "test", limit: int | None = None) -> EvalSet:
    """`easy-vqa` (its `split`) or a JSONL file (every usable row; `split` does not apply), first `limit` rows.

    Raises ValueError for an unknown split, `DatasetError` for a JSONL file without a usable row."""
    if str(dataset) == EASY_VQA:
        questions, answers, paths = load_split(split, limit)
        return EvalSet(EASY_VQA, split, questions, answers, paths, typed=True)
    rows, errors = read_jsonl(Path(dataset))
    rows = rows if limit is None else rows[:limit]
    return EvalSet(str(dataset), None, [r.question for r in rows], [r.answer for r in rows],
                   [str(r.image) for r in rows], typed=False, skipped=tuple(errors))


def _answer_all(model: LoadedModel, questions: Sequence[str], paths: Sequence[str], batch_size: int,
                max_new_tokens: int, desc: str) -> tuple[list[str], float]:
    out: list[str] = []
    started = time.perf_counter()
    for first in tqdm(range(0, len(questions), batch_size), desc=desc, unit="batch", leave=False):
        chunk = slice(first, first + batch_size)
        images = [Image.open(p).convert("RGB") for p in paths[chunk]]
        out += model.answer(images, list(questions[chunk]), max_new_tokens=max_new_tokens)
    return out, time.perf_counter() - started


def score(questions: Sequence[str], gold: Sequence[str], predicted: Sequence[str], split: str | None,
          seconds: float, *, typed: bool = True, dataset: str = EASY_VQA, skipped_rows: int = 0) -> EvalReport:
    """Exact matches overall and, when `typed` (easy-vqa), per question type."""
    totals, hits = Counter(), Counter()
    for q, a, p in zip(questions, gold, predicted, strict=True):
        kind = question_type(q, a) if typed else "all"
        totals[kind] += 1
        hits[kind] += normalise(p) == normalise(a)
    correct = sum(hits.values())
    total = len(gold)
    per_type = ({k: {"total": totals[k], "correct": hits[k], "accuracy": hits[k] / totals[k]} for k in sorted(totals)}
                if typed else None)
    return EvalReport(split=split, total=total, correct=correct, accuracy=correct / max(total, 1),
                      per_type=per_type, seconds=round(seconds, 3),
                      questions_per_s=round(total / seconds, 2) if seconds > 0 else 0.0, answers=list(predicted),
                      dataset=dataset, skipped_rows=skipped_rows)


def evaluate_set(model: LoadedModel, rows: EvalSet, batch_size: int = 64, max_new_tokens: int = 4) -> EvalReport:
    predicted, seconds = _answer_all(model, rows.questions, rows.image_paths, batch_size, max_new_tokens,
                                     f"eval {model.name}")
    return score(rows.questions, rows.answers, predicted, rows.split, seconds, typed=rows.typed,
                 dataset=rows.dataset, skipped_rows=len(rows.skipped))


def evaluate(model: LoadedModel, split: str = "test", limit: int | None = None, batch_size: int = 64,
             max_new_tokens: int = 4, *, dataset: str | Path = EASY_VQA) -> EvalReport:
    """Exact-match accuracy of `model` on `dataset` (easy-vqa `split`, or a JSONL file, where `split` is
    ignored), the first `limit` questions (None = all)."""
    return evaluate_set(model, load_eval_set(dataset, split, limit), batch_size, max_new_tokens)


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
              batch_size: int = 64, *, dataset: str | Path = EASY_VQA) -> Agreement:
    """How often two models give the same (normalised) answer, with both accuracies."""
    return agreement_on(a, b, load_eval_set(dataset, split, limit), batch_size)


def agreement_on(a: LoadedModel, b: LoadedModel, rows: EvalSet, batch_size: int = 64) -> Agreement:
    report_a = evaluate_set(a, rows, batch_size)
    report_b = evaluate_set(b, rows, batch_size)
    same = sum(normalise(x) == normalise(y) for x, y in zip(report_a.answers, report_b.answers, strict=True))
    return Agreement(total=report_a.total, identical=same, agreement=same / max(report_a.total, 1),
                     a=report_a, b=report_b)
