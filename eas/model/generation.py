"""Generation for converted and plain models: the library API of the service, evaluation and benchmarks.

Exactness. Every call runs transformers' `generate` steps: `model.generate` itself, or — with `loop="auto"`
(the default, on the CPU) or `loop="eas"`, wherever it applies — eas.model.decoding, the same greedy loop
through the model's own hooks without `generate`'s per-call set-up (same ids and bit-equal scores,
tests/core/test_decoding.py); `loop="transformers"` always calls `model.generate`. On a converted model
`model.generate` is the one eas.model.stock_generate installs (prompt statistics frozen at the prefill, a
DummyLayer in every skipped cache slot), so this module's path and plain `model.generate(**batch)` give
the same ids and logits (tests/core/test_stock_generate.py). Decoding decisions are made by a logits
processor and a stopping criterion handed to the loop; the forward passes are untouched.

API
---
`generate(model, batch, max_new_tokens=8, **options) -> Tensor`
    ids with the prompt, `[B, N + T]`, like `model.generate` (any other keyword, e.g. `use_cache`,
    `num_beams`, `output_logits`, goes to `model.generate` unchanged; `return_dict_in_generate=True`
    returns transformers' output object). Rows that stopped early are padded with the pad id.
`generate_rows(model, batch, max_new_tokens=8, **options) -> list[RowResult]`
    one result per row: `token_ids` (generated ids, up to and including the token that stopped the row;
    no padding), `finish_reason` ("stop": EOS, a stop token or a stop string; "length": the row's token
    limit; "cancelled": `on_step` stopped it), `stop` (the stop string or token id that matched) and,
    with a tokenizer, `text` (decoded without special tokens, cut before the stop string; a stop token
    id is not decoded).

Options, batch-wide keywords or per row through `rows=[RowOptions(...), ...]` (one per batch row; a
batch-wide keyword is the default of every row):
- `do_sample` (False), `temperature` (1.0), `top_p` (1.0), `seed` (None). A row samples when
  `do_sample` is true and `temperature > 0`; `temperature=0` is greedy, exactly (the row's scores are
  left alone and transformers takes the argmax). Sampling: softmax(scores / temperature), nucleus
  filtered to the smallest set of tokens whose probability reaches `top_p` (at least one token), then
  one draw with the row's own `torch.Generator` seeded with `seed`.
  **Reproducibility per row:** each row draws from its own generator, one draw per generated token, so a
  seeded row gives the same tokens whatever its batch-mates are, where they sit in the batch, or
  whether it runs alone — up to the float rounding by which a batched forward differs from a lone one
  (≤ 1e-5 on logits), which can flip a draw only when it lands exactly on a probability boundary. The
  same seed on two rows with the same prompt gives the same tokens. Without a seed, a sampling row's
  generator is seeded from torch's global RNG (so `torch.manual_seed` makes a whole call repeatable).
- `max_new_tokens` per row (`RowOptions.max_new_tokens`; default the call's): the row finishes with
  "length" at its own limit; the call runs until every row has finished.
- `stop` (strings) and `stop_token_ids`: a row stops at the first token after which its decoded text
  contains a stop string, or at a stop token; the model's EOS ids always stop a row. Stop strings need
  `tokenizer=` (the processor's tokenizer).
- `on_step(event: StepEvent) -> Iterable[int] | None`: called once per decoding step, right after the
  step's tokens exist and before the next forward, with the new token id of every row (`None` for rows
  that had already finished), each row's finish reason so far, and (with a tokenizer) each row's text
  that is safe to stream (stop-cut, and holding back a tail that could still become a stop string or
  is an incomplete character). It returns the rows to stop now (a client that disconnected): they
  finish with "cancelled" and the call ends as soon as no row is running. Streaming works while
  requests share a batch: every row's token arrives at every step.

Beam search (`num_beams>1`) is exact through `generate` (greedy options only): sampling, per-row
options and `on_step` are refused with beams. One call at a time per model instance (the model's
pooling state belongs to the running call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import BatchFeature, LogitsProcessor, PreTrainedModel, StoppingCriteria

from eas.model import decoding

FinishReason = Literal["stop", "length", "cancelled"]
DecodeLoop = Literal["auto", "eas", "transformers"]


# What torch.Generator.manual_seed accepts: a seed outside it is refused before any work starts.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class RowOptions:
    """Decoding options of one batch row (one request)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def samples(self) -> bool:
        return self.do_sample and self.temperature > 0


@dataclass
class StepEvent:
    """What `on_step` receives after each decoding step (index `step`, 0 for the first new token)."""

    step: int
    tokens: list[int | None]
    finished: list[FinishReason | None]
    texts: list[str] | None = None  # stream-safe text so far, per row (with a tokenizer)


@dataclass
class RowResult:
    token_ids: list[int]
    finish_reason: FinishReason
    stop: str | int | None = None
    text: str | None = None


@dataclass
class _Row:
    options: RowOptions
    limit: int
    tokens: list[int] = field(default_factory=list)
    reason: FinishReason | None = None
    stop: str | int | None = None


def _eos_ids(model: PreTrainedModel, kwargs: dict[str, Any]) -> set[int]:
    eos = kwargs.get("eos_token_id")
    if eos is None:
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return {int(e) for e in (eos if isinstance(eos, list | tuple | set) else [eos])}


def stream_safe(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """(text cut before the earliest stop string, the stop that matched) — or, with no match, the text
    minus a tail that is a proper prefix of a stop string or an incomplete character, which a later
    token could still turn into something else."""
    hits = [(text.find(s), s) for s in stops if s in text]
    if hits:
        at, stop = min(hits)
        return text[:at], stop
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    safe = text[: len(text) - hold]
    return safe.rstrip("\ufffd"), None


class _RowSampler(LogitsProcessor):
    """Samples the rows that ask for it, each from its own generator; greedy rows pass through. A
    sampled row's scores become 0 at the drawn token and -inf elsewhere, so the argmax that follows
    (transformers runs in greedy mode) picks it."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = [(i, r.options) for i, r in enumerate(rows) if r.options.samples]
        self.seeds = {i: o.seed if o.seed is not None else int(torch.randint(0, 2**62, ()).item())
                      for i, o in self.rows}
        self.generators: dict[int, torch.Generator] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        out = scores.clone()
        for i, options in self.rows:
            gen = self.generators.get(i)
            if gen is None:
                gen = self.generators[i] = torch.Generator(device=scores.device).manual_seed(self.seeds[i])
            # In float64 and from the best score down: any temperature > 0 then gives finite logits (the best
            # token's is 0), so a tiny one (1e-300 is 0 in float32) samples like greedy instead of dividing
            # by zero into NaNs.
            row = scores[i].double()
            probs = torch.softmax((row - row.max()) / options.temperature, dim=-1)
            if options.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
                outside = before >= options.top_p
                outside[0] = False  # the top token always stays, however small top_p is
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            token = torch.multinomial(probs, 1, generator=gen)
            out[i] = float("-inf")
            out[i, token] = 0.0
        return out


class _RowController(StoppingCriteria):
    """Per-row stopping (EOS, stop ids, stop strings, per-row limits, cancellation) and the step callback."""

    def __init__(self, rows: list[_Row], prompt_len: int, eos: set[int], tokenizer: Any,
                 on_step: Callable[[StepEvent], Iterable[int] | None] | None) -> None:
        self.rows = rows
        self.prompt_len = prompt_len
        self.eos = eos
        self.tokenizer = tokenizer
        self.on_step = on_step

    def _text(self, row: _Row) -> str:
        ids = row.tokens
        if row.reason == "stop" and isinstance(row.stop, int):
            ids = ids[:-1]  # a stop token is not part of the answer
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        step = input_ids.shape[1] - self.prompt_len - 1
        new = input_ids[:, -1].tolist()
        tokens: list[int | None] = []
        for row, token in zip(self.rows, new, strict=True):
            if row.reason is not None:
                tokens.append(None)
                continue
            tokens.append(token)
            row.tokens.append(token)
            if token in row.options.stop_token_ids or token in self.eos:
                row.reason, row.stop = "stop", token
            elif row.options.stop and (hit := stream_safe(self._text(row), row.options.stop)[1]) is not None:
                row.reason, row.stop = "stop", hit
            elif len(row.tokens) >= row.limit:
                row.reason = "length"
        if self.on_step is not None:
            texts = [self._shown(r) for r in self.rows] if self.tokenizer is not None else None
            event = StepEvent(step=step, tokens=tokens, finished=[r.reason for r in self.rows], texts=texts)
            for i in self.on_step(event) or ():
                if self.rows[i].reason is None:
                    self.rows[i].reason = "cancelled"
        return torch.tensor([r.reason is not None for r in self.rows], dtype=torch.bool, device=input_ids.device)

    def _shown(self, row: _Row) -> str:
        """A running row's stream-safe text; a finished row's final text (cut before its stop string)."""
        text = self._text(row)
        if row.reason is None:
            return stream_safe(text, row.options.stop)[0]
        if isinstance(row.stop, str):
            return text[: text.find(row.stop)]
        return text

    def result(self, i: int) -> RowResult:
        row = self.rows[i]
        text = self._shown(row) if self.tokenizer is not None else None
        return RowResult(token_ids=list(row.tokens), finish_reason=row.reason or "length", stop=row.stop, text=text)


def _row_options(n: int, rows: Sequence[RowOptions] | None, defaults: RowOptions) -> list[RowOptions]:
    if rows is None:
        return [defaults] * n
    if len(rows) != n:
        raise ValueError(f"rows has {len(rows)} entries for a batch of {n}")
    return list(rows)


def _run(model: PreTrainedModel, batch: BatchFeature | dict, max_new_tokens: int, *, rows: Sequence[RowOptions] | None,
         defaults: RowOptions, tokenizer: Any, on_step: Callable[[StepEvent], Iterable[int] | None] | None,
         control: bool, kwargs: dict[str, Any], loop: DecodeLoop = "auto") -> tuple[Any, _RowController | None]:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n, prompt_len = batch["input_ids"].shape[:2]
    options = _row_options(n, rows, defaults)
    state = [_Row(o, o.max_new_tokens or max_new_tokens) for o in options]
    sampling = any(o.samples for o in options)
    custom = sampling or control or on_step is not None or rows is not None or any(
        o.stop or o.stop_token_ids or o.max_new_tokens for o in options)
    if kwargs.get("num_beams", 1) > 1 or kwargs.get("num_return_sequences", 1) > 1:
        if custom:
            raise ValueError("beam search / num_return_sequences take batch-wide greedy options only: "
                             "sampling, stop options, per-row limits and on_step are per row")
        return model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **kwargs), None
    if any(o.stop for o in options) and tokenizer is None:
        raise ValueError("stop strings need the tokenizer (tokenizer=processor.tokenizer)")
    kwargs["do_sample"] = False  # sampling, when asked, is _RowSampler's: one generator per row
    controller = None
    if custom:
        processors = list(kwargs.pop("logits_processor", None) or [])
        criteria = list(kwargs.pop("stopping_criteria", None) or [])
        if sampling:
            processors.append(_RowSampler(state))
        controller = _RowController(state, prompt_len, _eos_ids(model, kwargs), tokenizer, on_step)
        criteria.append(controller)
        kwargs["logits_processor"] = processors
        kwargs["stopping_criteria"] = criteria
        max_new_tokens = max(r.limit for r in state)
    own = _own_loop(model, batch, kwargs, loop)
    if own is not None:
        out = own.generate(batch, max_new_tokens, kwargs.get("logits_processor"), kwargs.get("stopping_criteria"))
    else:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
    return out, controller


def _own_loop(model: PreTrainedModel, batch: BatchFeature | dict, kwargs: dict[str, Any],
              loop: DecodeLoop) -> decoding.Decoder | None:
    """The eas.model.decoding loop to run this call, or None for `model.generate`. "auto": where it applies,
    on the CPU (where its saving was measured); "eas": wherever it applies; "transformers": never."""
    if loop not in ("auto", "eas", "transformers"):
        raise ValueError(f"loop must be 'auto', 'eas' or 'transformers', got {loop!r}")
    if loop == "transformers" or (loop == "auto" and model.device.type != "cpu"):
        return None
    return decoding.for_call(model, batch, kwargs)


def generate(model: PreTrainedModel, batch: BatchFeature | dict, max_new_tokens: int = 8,
             plan: object | None = None, *, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
             rows: Sequence[RowOptions] | None = None, tokenizer: Any = None,
             on_step: Callable[[StepEvent], Iterable[int] | None] | None = None, loop: DecodeLoop = "auto",
             **kwargs: Any) -> Any:
    """Ids with the prompt (see the module docstring). `plan` is accepted for symmetry; a converted
    model's own recorded plan is authoritative."""
    defaults = RowOptions(do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                          stop=tuple(stop), stop_token_ids=tuple(stop_token_ids))
    out, controller = _run(model, batch, max_new_tokens, rows=rows, defaults=defaults, tokenizer=tokenizer,
                           on_step=on_step, control=False, kwargs=dict(kwargs), loop=loop)
    if controller is not None:
        # transformers pads finished rows only when the model has an EOS id; pad what a row made after its end.
        sequences = out.sequences if hasattr(out, "sequences") else out
        config = kwargs.get("generation_config") or model.generation_config
        pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
        pad = 0 if pad is None else int(pad if not isinstance(pad, list | tuple) else pad[0])
        for i, row in enumerate(controller.rows):
            sequences[i, controller.prompt_len + len(row.tokens):] = pad
    return out


def generate_rows(model: PreTrainedModel, batch: BatchFeature | dict, max_new_tokens: int = 8, *,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                  stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                  rows: Sequence[RowOptions] | None = None, tokenizer: Any = None,
                  on_step: Callable[[StepEvent], Iterable[int] | None] | None = None,
                  loop: DecodeLoop = "auto", **kwargs: Any) -> list[RowResult]:
    """One `RowResult` per batch row (see the module docstring)."""
    if kwargs.get("return_dict_in_generate"):
        raise ValueError("generate_rows returns RowResults; use generate for transformers' output object")
    defaults = RowOptions(do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                          stop=tuple(stop), stop_token_ids=tuple(stop_token_ids))
    _, controller = _run(model, batch, max_new_tokens, rows=rows, defaults=defaults, tokenizer=tokenizer,
                         on_step=on_step, control=True, kwargs=dict(kwargs), loop=loop)
    assert controller is not None
    return [controller.result(i) for i in range(len(controller.rows))]

