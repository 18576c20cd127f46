"""Runs one padded batch through a `LoadedModel` (on the batcher's worker thread, never the event loop).

All model specifics — prompts, left padding, EAS skipped layers and KV layout — stay behind
`LoadedModel.prepare / generate_ids / decode`; this class only adds per-request bookkeeping: each
request's own `max_new_tokens` (the batch generates to the largest and each row is cut to its own;
greedy decoding makes the cut prefix identical to a shorter run), token counts and timings — including
the vision encoder / prefill / decode split, measured by forward hooks (service/runner/phases.py).
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import StoppingCriteria

from eas.model.loading import LoadedModel
from eas.model.token_reduction import tokens_dropped
from service.batching.work import Generation, WorkItem
from service.runner.phases import PhaseTimer
from service.runner.sampling import RowControl, controlled_generations
from service.runner.threads import ThreadBudget


@dataclass(frozen=True)
class VariantInfo:
    """What is served under a variant name: which model version, from where, on what."""

    variant: str  # "eas" or "baseline"
    model: str
    version: str
    kind: str  # "converted" or "baseline" (store kind; "local" for directories given by path)
    path: Path
    parent: str | None = None
    # True when the model store has just checked every file against its manifest (service/runner/resolve.py):
    # the loader then does not hash them a second time. A directory given by path is verified by the loader.
    verified: bool = False


class ModelRunner:
    def __init__(self, model: LoadedModel, info: VariantInfo, threads: ThreadBudget | None = None) -> None:
        self.model = model
        self.info = info
        self.threads = threads or ThreadBudget()
        self._eos_ids = _eos_ids(model)
        self._phases = PhaseTimer(model.model, model.device)

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def skipped_layers(self) -> tuple[int, ...]:
        """Decoder layers whose attention the EAS plan skips (empty for an unskipped model)."""
        plan = self.model.plan
        return plan.skipped if plan is not None else ()

    def run_batch(self, items: list[WorkItem]) -> list[Generation]:
        self.threads.apply()  # runs in this variant's inference thread, where OpenMP reads it
        rows = [RowControl(i.sampling, i.max_new_tokens, sink=i.sink, cancelled=i.cancelled) for i in items]
        # Requests prepared in the preprocessing pool (service/preprocess.py) are only collated here.
        features = [i.features for i in items]
        return self.generate([i.image for i in items], [i.question for i in items],
                             [i.max_new_tokens for i in items], rows=rows,
                             features=features if all(f is not None for f in features) else None)

    def generate(self, images: list[Image.Image], questions: list[str], max_new_tokens: list[int],
                 rows: list[RowControl] | None = None, features: list[Any] | None = None) -> list[Generation]:
        t0 = time.perf_counter()
        # Always per request, then collated: the tokenizer is never switched to padding, which would race
        # with the preprocessing threads' use of it (the Rust tokenizer refuses concurrent reconfiguration).
        if features is None:
            features = [self.model.prepare_one(image, q) for image, q in zip(images, questions, strict=True)]
        batch = self.model.collate(features)
        t1 = time.perf_counter()
        if rows is not None and not all(r.sampling.plain and r.sink is None for r in rows):
            # Sampling, stop conditions or streaming: per-row control of each step (service/runner/sampling.py).
            return controlled_generations(self.model, batch, rows, prepare_s=t1 - t0, measure=self._phases.measure)
        started = time.monotonic()
        # A plain batch nobody waits for any more (every row cancelled: deadline, client gone) ends at its next
        # step; otherwise the criterion never fires and the generation is the unmodified one.
        generate_ids = self.model.generate_ids
        options = {"stopping_criteria": [_AllCancelled(rows)]} if rows and _takes_options(generate_ids) else {}
        with self._phases.measure() as marks:
            ids = generate_ids(batch, max(max_new_tokens), **options)
        texts = self._decode(ids, max_new_tokens)  # copies ids to the host: the GPU work is done here
        t2 = time.perf_counter()
        phases = marks.seconds()  # after the host copy, so reading CUDA events never waits
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist() if "attention_mask" in batch else (
            [int(batch["input_ids"].shape[1])] * len(images))
        dropped = tokens_dropped(self.model.model)
        first_token_at = started + phases.get("vision_encoder", 0.0) + phases.get("prefill", 0.0)
        steps = int(ids.shape[1])  # every row waited for each step of the batch
        tpot = phases["decode"] / (steps - 1) if steps > 1 and "decode" in phases else None
        out = []
        for row, limit, text, n_prompt in zip(ids.tolist(), max_new_tokens, texts, prompt_tokens, strict=True):
            row = row[:limit]
            stop = next((k for k, tok in enumerate(row) if tok in self._eos_ids), None)
            out.append(Generation(
                text=text,
                prompt_tokens=int(n_prompt),
                completion_tokens=len(row) if stop is None else stop + 1,
                finish_reason="length" if stop is None else "stop",
                prepare_s=t1 - t0,
                inference_s=t2 - t1,
                batch_size=len(images),
                phases=phases,
                first_token_at=first_token_at if "prefill" in phases else None,
                tpot_s=tpot,
                decoder_prompt_tokens=int(n_prompt) - dropped,
            ))
        return out

    def _decode(self, ids: torch.Tensor, limits: list[int]) -> list[str]:
        # One decode call for the usual case (every request asked for the same length).
        if len(set(limits)) == 1:
            return self.model.decode(ids[:, : limits[0]])
        return [self.model.decode(ids[i : i + 1, :n])[0] for i, n in enumerate(limits)]

    def close(self) -> None:
        """Release what the runner holds beyond its model (nothing here; a ProcessRunner's child process)."""

    def warm_up(self, max_new_tokens: int) -> Generation:
        """One real generation, so the first client request does not pay for lazy initialisation."""
        return self.generate([warmup_image()], ["what colour is the shape?"], [max_new_tokens])[0]


@functools.lru_cache(maxsize=64)
def _accepts_options(function: Any) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "stopping_criteria" for p in parameters)


def _takes_options(generate_ids: Any) -> bool:
    """Does this `generate_ids` take generation options? `LoadedModel.generate_ids` does; a loader's wrapper
    written for the older `(batch, max_new_tokens)` signature is called without them (its batches then run to
    their end when every row is cancelled, as before)."""
    return _accepts_options(getattr(generate_ids, "__func__", generate_ids))


class _AllCancelled(StoppingCriteria):
    """Stops a plain batch once every one of its rows is cancelled (the per-step path stops rows one by one)."""

    def __init__(self, rows: list[RowControl]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        over = all(row.cancelled.is_set() for row in self.rows)
        return torch.full((input_ids.shape[0],), over, dtype=torch.bool, device=input_ids.device)


def warmup_image(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(200, 30, 30))
    return image


def _eos_ids(model: LoadedModel) -> frozenset[int]:
    eos = getattr(getattr(model.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model.processor, "tokenizer", None), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list | tuple) else [eos])
