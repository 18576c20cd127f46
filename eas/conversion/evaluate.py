"""Source vs converted, measured at the end of a conversion: accuracy and batch-1 latency.

- Accuracy on easy-vqa uses the project's evaluation harness on the **test** split (`eas.evaluation`),
  so conversion numbers are comparable with every other report. A JSONL dataset has no test split; its
  held-out validation rows are scored instead, by exact match (case and surrounding spaces ignored).
- Latency: the two models are timed *interleaved* (source, converted, converted, source, ...) on the
  same batch-1 prompts with the same fixed number of new tokens, and the medians are compared, so slow
  drifts of a shared machine hit both alike.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from eas.conversion.data import VQASample, fixed_batches, load_images
from eas.conversion.errors import check_cancel
from eas.model.generation import generate
from eas.model.loading import LoadedModel


@dataclass(frozen=True)
class Accuracy:
    accuracy: float
    correct: int
    total: int
    split: str
    source: str  # "harness" or "exact-match"

    def to_dict(self) -> dict:
        return asdict(self)


def normalise(text: str) -> str:
    return text.strip().strip(".").strip().lower()


@torch.inference_mode()
def exact_match(loaded: LoadedModel, samples: Sequence[VQASample], *, batch_size: int = 64,
                max_new_tokens: int = 8, cancel: threading.Event | None = None, split: str = "validation") -> Accuracy:
    correct = 0
    for chunk in fixed_batches(samples, batch_size):
        check_cancel(cancel, "evaluation")
        answers = loaded.answer(load_images(chunk), [s.question for s in chunk], max_new_tokens=max_new_tokens)
        correct += sum(normalise(a) == normalise(s.answer) for a, s in zip(answers, chunk, strict=True))
    total = len(samples)
    return Accuracy(accuracy=correct / max(total, 1), correct=correct, total=total, split=split, source="exact-match")


def easy_vqa_accuracy(loaded: LoadedModel, *, limit: int | None, cancel: threading.Event | None = None) -> Accuracy:
    """The harness on the easy-vqa test split (`limit` questions, None = all)."""
    check_cancel(cancel, "evaluation")
    try:
        from eas.evaluation import evaluate
    except ImportError:  # harness not installed in this tree: same metric, computed here
        from eas.conversion.data import easy_vqa_test

        rows = easy_vqa_test()
        return exact_match(loaded, rows if limit is None else rows[:limit], cancel=cancel, split="test")
    report = evaluate(loaded, split="test", limit=limit)
    accuracy = float(report.accuracy)
    total = int(getattr(report, "total", 0) or getattr(report, "count", 0) or (limit or 0))
    correct = int(getattr(report, "correct", round(accuracy * total)))
    return Accuracy(accuracy=accuracy, correct=correct, total=total, split="test", source="harness")


@dataclass(frozen=True)
class Latency:
    source_s: float
    converted_s: float
    runs: int
    prompts: int
    new_tokens: int
    device: str

    @property
    def speedup(self) -> float:
        return self.source_s / self.converted_s

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def _timed(loaded: LoadedModel, batch, new_tokens: int) -> float:
    device = loaded.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    generate(loaded.model, batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def interleaved_latency(source: LoadedModel, converted: LoadedModel, samples: Sequence[VQASample], *,
                        runs: int = 7, new_tokens: int = 4, cancel: threading.Event | None = None) -> Latency:
    """Median batch-1 generation time of each model over `runs` rounds of `samples`, interleaved."""
    prompts = [(load_images([s]), [s.question]) for s in samples]
    times: dict[str, list[float]] = {"source": [], "converted": []}
    models = {"source": source, "converted": converted}
    for loaded in models.values():  # warm-up, untimed
        _timed(loaded, loaded.prepare(*prompts[0]), new_tokens)
    for r in range(runs):
        order = ("source", "converted") if r % 2 == 0 else ("converted", "source")
        for images, questions in prompts:
            check_cancel(cancel, "latency measurement")
            for name in order:
                loaded = models[name]
                times[name].append(_timed(loaded, loaded.prepare(images, questions), new_tokens))
    return Latency(source_s=statistics.median(times["source"]), converted_s=statistics.median(times["converted"]),
                   runs=runs, prompts=len(prompts), new_tokens=new_tokens, device=str(source.device))
