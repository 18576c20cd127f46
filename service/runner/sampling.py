"""Per-request sampling, stop conditions and token streaming for one batch, on the library's
`eas.model.generation.generate_rows` (per-row `RowOptions`, a per-step `on_step` callback).

This module is the service's side of it: each request's `RowControl` carries its options in and its
results out, its stream sink, and its cancel flag (set when the client is gone). The step callback
records when each row's first and last tokens existed (the TTFT/TPOT metrics), hands each streamed row
the text that became final at this step, and tells the library which rows to stop. Greedy rows of the
same batch are decoded exactly as on the plain path (temperature 0 leaves a row's scores alone).

Answers are stripped, as `LoadedModel.decode` strips them; so a stream holds back trailing whitespace
until more text follows, and the concatenated deltas equal the final answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from transformers import BatchFeature

from eas.model.loading import LoadedModel
from eas.model.token_reduction import tokens_dropped
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


def _emit(row: RowControl, text: str) -> None:
    """Hand the sink the part of `text` it has not had. `text` is already stream-safe (cut before a stop
    string, no half character: the library sees to that); a running row also keeps back trailing
    whitespace, which the final answer strips."""
    if row.sink is None:
        return
    final = text.strip()
    if final.startswith(row.emitted) and len(final) > len(row.emitted):
        delta, row.emitted = final[len(row.emitted):], final
        row.sink(delta)


def generate_controlled(model: LoadedModel, batch: BatchFeature, rows: list[RowControl]) -> None:
    """Run one batch with every row under its own control; results land in `rows`."""
    from eas.model.generation import RowOptions, StepEvent, generate_rows

    def on_step(event: StepEvent) -> list[int]:
        now = time.monotonic()
        for i, row in enumerate(rows):
            if event.tokens[i] is not None:
                if row.first_token_at is None:
                    row.first_token_at = now
                row.last_token_at = now
            if row.sink is not None and event.texts is not None and event.finished[i] != "cancelled":
                _emit(row, event.texts[i])
        return [i for i, row in enumerate(rows) if row.cancelled.is_set() and event.finished[i] is None]

    options = [RowOptions(do_sample=not r.sampling.greedy, temperature=r.sampling.temperature or 1.0,
                          top_p=r.sampling.top_p, seed=r.sampling.seed, max_new_tokens=r.max_new_tokens,
                          stop=r.sampling.stop, stop_token_ids=r.sampling.stop_token_ids) for r in rows]
    with torch.inference_mode():
        results = generate_rows(model.model, batch, max(r.max_new_tokens for r in rows), rows=options,
                                tokenizer=getattr(model.processor, "tokenizer", model.processor), on_step=on_step,
                                loop=model.decode_loop)
    for row, result in zip(rows, results, strict=True):
        row.tokens, row.finish_reason = result.token_ids, result.finish_reason
        row.text = (result.text or "").strip()
        if row.finish_reason != "cancelled":
            _emit(row, row.text)  # flush what was held back


def controlled_generations(model: LoadedModel, batch: BatchFeature, rows: list[RowControl], *, prepare_s: float,
                           measure: Callable[[], AbstractContextManager[PhaseMarks]]) -> list[Generation]:
    """`generate_controlled` for a runner: one `Generation` per row, timed like the plain path."""
    t1 = time.perf_counter()
    with measure() as marks:
        generate_controlled(model, batch, rows)
    inference_s = time.perf_counter() - t1
    phases = marks.seconds()
    prompt_tokens = (batch["attention_mask"].sum(dim=1).tolist() if "attention_mask" in batch
                     else [int(batch["input_ids"].shape[1])] * len(rows))
    dropped = tokens_dropped(model.model)
    out = []
    for row, n_prompt in zip(rows, prompt_tokens, strict=True):
        n = len(row.tokens)
        tpot = ((row.last_token_at - row.first_token_at) / (n - 1)
                if n > 1 and row.first_token_at is not None and row.last_token_at is not None else None)
        out.append(Generation(
            text=row.text, prompt_tokens=int(n_prompt), completion_tokens=n,
            finish_reason=row.finish_reason or "length", prepare_s=prepare_s, inference_s=inference_s,
            batch_size=len(rows), phases=phases, first_token_at=row.first_token_at, tpot_s=tpot,
            decoder_prompt_tokens=int(n_prompt) - dropped,
        ))
    return out
