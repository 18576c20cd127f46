"""Per-request sampling, stop conditions and token streaming inside one batched `generate` call.

The library's `eas.model.generation.generate` passes extra keyword arguments through to transformers'
`generate`, so everything here rides on transformers' own extension points and leaves the EAS-specific
parts (pooling state, KV layout) untouched:

- `RowSampler` (a `LogitsProcessor`, run after transformers' own) draws each sampled row's token from its
  own seeded `torch.Generator` (temperature, top-p) and leaves only that token possible, so the greedy
  `argmax` that follows picks it. Greedy rows are left as they are. Each row has its own generator, so a
  seeded request draws the same tokens whatever else shares its batch.
- `RowStopper` (a `StoppingCriteria`, called once per step after the new tokens are appended) is the
  per-step callback: it finishes a row at its own `max_new_tokens`, at end of sequence, at a stop token or
  a stop string, or when its client is gone; it records when each row's first and last tokens existed and
  hands newly final text to the row's stream sink. When every row is finished transformers stops the loop.

Stop strings are matched on the decoded text (a stop string may span tokens); the text returned and
streamed ends before the first stop string, and text that could still become a stop string is held back
until it cannot.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from transformers import BatchFeature, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from eas.model.loading import LoadedModel
from service.batching.work import Generation, Sampling, TokenSink
from service.runner.phases import PhaseMarks


@dataclass(eq=False)
class RowControl:
    """One request's side of a batch: its options in, its results out (filled on the worker thread)."""

    sampling: Sampling
    max_new_tokens: int
    sink: TokenSink | None = None  # receives text deltas as they become final (streaming)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # --- results -------------------------------------------------------------------------------------
    tokens: list[int] = field(default_factory=list)  # generated ids up to and including the stopping one
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    text: str = ""
    emitted: str = ""  # the part of `text` already handed to the sink
    first_token_at: float | None = None  # time.monotonic()
    last_token_at: float | None = None
    _generator: torch.Generator | None = None

    def generator(self) -> torch.Generator:
        if self._generator is None:
            seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
            self._generator = torch.Generator(device="cpu").manual_seed(seed)
        return self._generator

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from `logits` (one row) at the row's temperature and nucleus (top-p)."""
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs[before >= sampling.top_p] = 0.0  # the first token always stays (its `before` is 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class RowSampler(LogitsProcessor):
    def __init__(self, rows: list[RowControl]) -> None:
        self.rows = rows
        self.sampled = [i for i, r in enumerate(rows) if not r.sampling.greedy]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.sampled:
            return scores
        scores = scores.clone()
        for i in self.sampled:
            row = self.rows[i]
            if row.done:
                continue
            token = sample_token(scores[i], row.sampling, row.generator())
            scores[i].fill_(float("-inf"))
            scores[i, token] = 0.0
        return scores


class RowStopper(StoppingCriteria):
    def __init__(self, rows: list[RowControl], decode: Callable[[list[int]], str], eos_ids: frozenset[int]) -> None:
        self.rows = rows
        self.decode = decode
        self.eos_ids = eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        now = time.monotonic()
        last = input_ids[:, -1].tolist()  # one host copy per step for the whole batch
        finished = []
        for row, token in zip(self.rows, last, strict=True):
            if not row.done:
                self._step(row, int(token), now)
            finished.append(row.done)
        return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)

    def _step(self, row: RowControl, token: int, now: float) -> None:
        if row.cancelled.is_set():
            row.finish_reason = "cancelled"
            return
        row.tokens.append(token)
        if row.first_token_at is None:
            row.first_token_at = now
        row.last_token_at = now
        if token in self.eos_ids or token in row.sampling.stop_token_ids:
            row.finish_reason = "stop"
        elif len(row.tokens) >= row.max_new_tokens:
            row.finish_reason = "length"
        if row.sink is None and not row.sampling.stop:
            return  # text is decoded once at the end; nothing to watch per step
        text = self.decode(_text_tokens(row, self.eos_ids))
        cut = _first_stop(text, row.sampling.stop)
        if cut is not None:
            text, row.finish_reason = text[:cut], "stop"
        row.text = text.strip()
        _emit(row, text)


def _emit(row: RowControl, raw: str) -> None:
    """Hand the sink only text that can no longer change: not trailing whitespace (the final answer is
    stripped), not a half-decoded character, not a suffix that may still grow into a stop string."""
    if row.sink is None or row.finish_reason == "cancelled":
        return
    final = raw.strip() if row.done else raw.lstrip()
    if not row.done:
        final = final.rstrip().removesuffix("\ufffd")
        final = final[: len(final) - _held_back(final, row.sampling.stop)]
    if final.startswith(row.emitted) and len(final) > len(row.emitted):
        delta, row.emitted = final[len(row.emitted):], final
        row.sink(delta)


def _text_tokens(row: RowControl, eos_ids: frozenset[int]) -> list[int]:
    """The tokens whose text is the answer: a final stop token or end of sequence is not text."""
    if row.tokens and (row.tokens[-1] in eos_ids or row.tokens[-1] in row.sampling.stop_token_ids):
        return row.tokens[:-1]
    return row.tokens


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def generate_controlled(model: LoadedModel, batch: BatchFeature, rows: list[RowControl],
                        eos_ids: frozenset[int]) -> None:
    """Run one batch with every row under its own control; results land in `rows`."""
    from eas.model.generation import generate  # EAS-aware: pooling state and KV-cache layout

    tokenizer = getattr(model.processor, "tokenizer", model.processor)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    with torch.inference_mode():
        generate(model.model, batch, max_new_tokens=max(r.max_new_tokens for r in rows), plan=model.plan,
                 logits_processor=LogitsProcessorList([RowSampler(rows)]),
                 stopping_criteria=StoppingCriteriaList([RowStopper(rows, decode, eos_ids)]))
    for row in rows:
        if row.finish_reason is None:  # the loop ended first (e.g. the model's own max_length)
            row.finish_reason = "length"
        if not row.sampling.stop and row.sink is None:
            row.text = decode(_text_tokens(row, eos_ids)).strip()
        _emit(row, row.text)  # flush what was held back (a no-op for rows that do not stream)


def controlled_generations(model: LoadedModel, batch: BatchFeature, rows: list[RowControl], eos_ids: frozenset[int],
                           *, prepare_s: float, measure: Callable[[], AbstractContextManager[PhaseMarks]]
                           ) -> list[Generation]:
    """`generate_controlled` for a runner: one `Generation` per row, timed like the plain path."""
    t1 = time.perf_counter()
    with measure() as marks:
        generate_controlled(model, batch, rows, eos_ids)
    inference_s = time.perf_counter() - t1
    phases = marks.seconds()
    prompt_tokens = (batch["attention_mask"].sum(dim=1).tolist() if "attention_mask" in batch
                     else [int(batch["input_ids"].shape[1])] * len(rows))
    out = []
    for row, n_prompt in zip(rows, prompt_tokens, strict=True):
        n = len(row.tokens)
        tpot = ((row.last_token_at - row.first_token_at) / (n - 1)
                if n > 1 and row.first_token_at is not None and row.last_token_at is not None else None)
        out.append(Generation(
            text=row.text, prompt_tokens=int(n_prompt), completion_tokens=n,
            finish_reason=row.finish_reason or "length", prepare_s=prepare_s, inference_s=inference_s,
            batch_size=len(rows), phases=phases, first_token_at=row.first_token_at, tpot_s=tpot,
        ))
    return out
