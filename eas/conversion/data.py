"""Datasets for a conversion: (image, question, answer) rows, validated up front, and their batches.

Two sources:
- `easy-vqa`: the built-in data set. Its *train* split feeds the search and the training; a held-out
  validation subset is carved from train **by image** (so no validation image is ever trained on) and
  serves the bandit rewards and in-conversion checks. The final accuracy uses the *test* split, through
  the evaluation harness, never these rows.
- a JSONL file with one `{"image": path, "question": str, "answer": str}` object per line, image paths
  relative to the file. Every row is checked before any work starts (bad JSON, missing or empty fields,
  missing or unreadable image); problems are reported with their line numbers. Bad rows are skipped and
  reported; a file without a single usable row is refused with `DatasetError`.

Batches follow the serving prompt exactly (`eas.model.prompting.build_prompt`), so what the adapters are
trained on is what the service will ask.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import ProcessorMixin

from eas.model.prompting import build_prompt

EASY_VQA = "easy-vqa"
IGNORE_INDEX = -100  # label of positions that are not supervised (prompt, padding)


@dataclass(frozen=True)
class VQASample:
    image: Path
    question: str
    answer: str
    line: int | None = None  # 1-based line of a JSONL source, for messages


@dataclass(frozen=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class DatasetError(ValueError):
    """A dataset cannot be used; `errors` lists every problem found (with line numbers for JSONL)."""

    def __init__(self, source: str, errors: Sequence[RowError | str], summary: str | None = None) -> None:
        self.source = source
        self.errors = list(errors)
        shown = "\n  ".join(str(e) for e in self.errors[:20])
        more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        head = summary or f"{source}: no usable rows"
        super().__init__(f"{head}\n  {shown}{more}" if self.errors else head)


@dataclass
class ConversionData:
    """The rows a conversion uses. `validation` is disjoint from `train`."""

    name: str
    train: list[VQASample]
    validation: list[VQASample]
    skipped: list[RowError] = field(default_factory=list)

    @property
    def is_easy_vqa(self) -> bool:
        return self.name == EASY_VQA


# --- loading --------------------------------------------------------------------------------------------


def load_dataset(spec: str | Path, *, val_size: int = 256, seed: int = 0) -> ConversionData:
    """`easy-vqa` or the path of a JSONL file; validation rows are held out of training (seeded)."""
    if str(spec) == EASY_VQA:
        return _easy_vqa(val_size, seed)
    path = Path(spec)
    rows, errors = read_jsonl(path)
    train, validation = _hold_out(rows, val_size, seed)
    return ConversionData(name=str(path), train=train, validation=validation, skipped=errors)


def _easy_vqa(val_size: int, seed: int) -> ConversionData:
    import easy_vqa  # data only; imported lazily so JSONL users do not need it

    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    by_image: dict[int, list[VQASample]] = {}
    for q, a, i in zip(questions, answers, image_ids, strict=True):
        by_image.setdefault(i, []).append(VQASample(Path(paths[i]), q, a))
    ids = sorted(by_image)
    random.Random(seed).shuffle(ids)
    validation: list[VQASample] = []
    held = set()
    for i in ids:
        if len(validation) >= val_size:
            break
        validation.extend(by_image[i])
        held.add(i)
    validation = validation[:val_size]
    train = [s for i in sorted(by_image) if i not in held for s in by_image[i]]
    return ConversionData(name=EASY_VQA, train=train, validation=validation)


def easy_vqa_test() -> list[VQASample]:
    """The easy-vqa test split (what the final accuracy is measured on)."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [VQASample(Path(paths[i]), q, a) for q, a, i in zip(questions, answers, image_ids, strict=True)]


def read_jsonl(path: Path) -> tuple[list[VQASample], list[RowError]]:
    """Every usable row and every problem (line-numbered). Raises DatasetError when nothing is usable."""
    if not path.is_file():
        raise DatasetError(str(path), [], summary=f"{path}: dataset file not found")
    rows: list[VQASample] = []
    errors: list[RowError] = []
    base = path.parent
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue  # blank lines (a trailing newline) are not rows
            sample, problem = _parse_row(text, number, base)
            if problem is not None:
                errors.append(RowError(number, problem))
            else:
                rows.append(sample)
    if not rows:
        summary = f"{path}: no usable rows" + (f" ({len(errors)} bad)" if errors else " (the file is empty)")
        raise DatasetError(str(path), errors, summary=summary)
    return rows, errors


def _parse_row(text: str, number: int, base: Path) -> tuple[VQASample | None, str | None]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    problems = []
    values = {}
    for key in ("image", "question", "answer"):
        value = obj.get(key)
        if value is None:
            problems.append(f"missing '{key}'")
        elif not isinstance(value, str):
            problems.append(f"'{key}' must be a string, got {type(value).__name__}")
        elif not value.strip():
            problems.append(f"empty '{key}'")
        else:
            values[key] = value.strip()
    if problems:
        return None, "; ".join(problems)
    image = Path(values["image"])
    image = image if image.is_absolute() else base / image
    if not image.is_file():
        return None, f"image file not found: {values['image']}"
    try:
        with Image.open(image) as im:
            im.verify()  # cheap integrity check: headers and, for PNG, chunk CRCs
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return None, f"unreadable image {values['image']}: {exc}"
    return VQASample(image, values["question"], values["answer"], line=number), None


def _hold_out(rows: list[VQASample], val_size: int, seed: int) -> tuple[list[VQASample], list[VQASample]]:
    """Seeded random validation rows; at most a fifth of a small file, and at least one training row."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = min(val_size, len(rows) // 5)
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# --- batches --------------------------------------------------------------------------------------------


def load_images(samples: Sequence[VQASample]) -> list[Image.Image]:
    images = []
    for s in samples:
        with Image.open(s.image) as im:
            images.append(im.convert("RGB"))
    return images


def answer_ids(processor: ProcessorMixin, answer: str) -> list[int]:
    """Target ids of an answer: " answer" (the space belongs to the first answer token, as in greedy
    generation after "answer:") followed by EOS, so the model learns to stop."""
    tokenizer = processor.tokenizer
    ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def training_batch(processor: ProcessorMixin, samples: Sequence[VQASample]) -> dict[str, torch.Tensor]:
    """Prompt + answer, right padded; labels are -100 on the prompt and the padding.

    Right padding is fine for training: the pooling hook reads `labels` and pools each sample over its
    non-padding positions before its first supervised token (eas-method.md §5 rule 2).
    """
    prompts = [build_prompt(processor, s.question) for s in samples]
    # One image per sample, nested (Gemma3's processor reads a flat list as all images of one prompt).
    enc = processor(images=[[im] for im in load_images(samples)], text=prompts, padding=False, return_tensors=None)
    pad = processor.tokenizer.pad_token_id
    sequences, labels = [], []
    for prompt_ids, sample in zip(enc["input_ids"], samples, strict=True):
        target = answer_ids(processor, sample.answer)
        sequences.append(list(prompt_ids) + target)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + target)
    width = max(len(s) for s in sequences)
    batch = {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]),
    }
    prompt_lengths = [len(ids) for ids in enc["input_ids"]]
    for key, value in enc.items():  # pixel_values and any model-specific image inputs
        if key in ("input_ids", "attention_mask", "labels"):  # PaliGemma's processor returns its own labels
            continue
        if (key.endswith("type_ids") and isinstance(value, list)
                and [len(v) if hasattr(v, "__len__") else None for v in value] == prompt_lengths):
            # per-token types (token_type_ids, mm_token_type_ids): the answer and padding are text, type 0
            batch[key] = torch.tensor([list(v) + [0] * (width - len(v)) for v in value])
        else:
            batch[key] = torch.as_tensor(value if not isinstance(value, list) else _stack(value))
    return batch


def _stack(values: list) -> torch.Tensor:
    return torch.stack([torch.as_tensor(v) for v in values])


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Move a batch; floating inputs (pixels) take the model's dtype."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


def batches(samples: Sequence[VQASample], batch_size: int, seed: int) -> Iterator[list[VQASample]]:
    """An endless stream of seeded shuffled epochs, cut into batches (the last partial batch of an epoch
    is merged into the next epoch's stream, so every batch is full)."""
    if not samples:
        return
    rng = random.Random(seed)
    pending: list[VQASample] = []
    while True:
        order = list(samples)
        rng.shuffle(order)
        pending.extend(order)
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]


def fixed_batches(samples: Sequence[VQASample], batch_size: int) -> list[list[VQASample]]:
    """Samples in order, cut into batches (the last one may be short): for evaluation passes."""
    return [list(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
