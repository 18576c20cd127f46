"""Redundancy criteria behind one interface, and their registry.

A criterion scores every decoder layer's attention sub-layer — **higher = more redundant** — and, given a
skip count k, turns the scores into a `SkipPlan` that records the criterion's name, all scores and the
source model's fingerprint. Selection is restricted to the *candidates* (layer 0 is excluded by default,
eas-method.md §6 project rules); scores of non-candidates are reported for information only.

| name      | module        | score                                            | cost                   |
|-----------|---------------|--------------------------------------------------|------------------------|
| `eas`     | bandit.py     | bandit preference H of the supernet search (§6)   | a supernet training run |
| `cosine`  | cosine.py     | E_t cos(x_t, x_t + Attn(LN(x_t))) (LLM-Drop)      | one forward pass        |
| `kl`      | kl.py         | −KL(p ‖ p without Attn_ℓ) at the answer position | L + 1 forward passes    |
| `recovery`| recovery.py   | −held-out loss after a short training of plan [ℓ] | short training per layer |
| `uniform` | baselines.py  | 1 on evenly spaced layers (needs k)              | none                    |
| `deepest` | baselines.py  | layer depth                                       | none                    |
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, ProcessorMixin

from eas.conversion.data import ConversionData
from eas.model.adapters import AdapterConfig
from eas.model.plan import SkipPlan, model_fingerprint


class SearchSettings(BaseModel):
    """Settings of the `eas` bandit search (eas-method.md §6; defaults: LaVIN column, see docs/conversion.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The bandit only learns something once the adapters can stand in for the attention they replace: LaVIN
    # trains the supernet for 5 of 10 epochs before its first update. On the embedded model 300 steps
    # (150 before the first update) ranked layers by the *immediate* harm of skipping them and chose a plan
    # that ends 1.6 points worse than the one 3,000 steps find (docs/conversion.md).
    steps: int = Field(3000, gt=0, description="supernet training steps")
    beta: float = Field(10.0, gt=0, description="π = softmax(β·H)")
    eta: float = Field(2.0, gt=0, description="bandit step size η")
    n_turn: int = Field(10, gt=0, description="an update round every n_turn steps after warm-up")
    n_subsets: int = Field(3, ge=2, description="subsets drawn (and scored on held-out data) per round")
    warmup_fraction: float = Field(0.5, ge=0, lt=1, description="no bandit updates before this share of steps")
    reward_batch_size: int = Field(64, gt=0, description="held-out samples per reward evaluation")


class RecoverySettings(BaseModel):
    """Settings of the `recovery` criterion (criteria/recovery.py; docs/conversion.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 50 steps already separate the layers of the embedded demo model clearly (held-out loss 0.004 / 0.005
    # against 0.029 for the one its adapters cannot replace; 25 steps keep the order); docs/conversion.md.
    steps: int = Field(50, gt=0, description="training steps of each one-layer probe")
    held_out_rows: int | None = Field(None, gt=0, description="held-out rows each probe is measured on; "
                                                                "None = all validation rows")
    # Not the request's lr: a probe is a measurement and must stay one when stage 2 is tuned. A short
    # schedule's higher stage-2 rate (the quick preset's 4e-3) made 30-step probes of the demo model rank
    # its least recoverable layer first (docs/conversion.md).
    lr: float | None = Field(None, gt=0, description="peak lr of each probe; None = 9e-3 * batch / 256")


@dataclass
class CriterionContext:
    """Everything a criterion may use. `model` is the unconverted source, on its device, frozen; a
    criterion must leave it exactly as it found it."""

    model: PreTrainedModel
    processor: ProcessorMixin
    num_layers: int
    candidates: tuple[int, ...]
    k: int | None
    data: ConversionData
    seed: int = 0
    calibration_samples: int = 64
    batch_size: int = 16
    lr: float | None = None
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    search: SearchSettings = field(default_factory=SearchSettings)
    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    cancel: threading.Event | None = None
    progress: Callable[[float, str], None] | None = None
    show_bar: bool = True

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(min(max(fraction, 0.0), 1.0), message)

    def calibration(self) -> list:
        """A seeded sample of training rows (image + question) for the one-shot criteria."""
        import random

        rows = list(self.data.train)
        random.Random(self.seed).shuffle(rows)
        return rows[: self.calibration_samples]


@dataclass
class CriterionResult:
    criterion: str
    scores: tuple[float, ...]
    plan: SkipPlan | None
    details: dict[str, Any] = field(default_factory=dict)


class Criterion(Protocol):
    """Scores layers (higher = more redundant) and picks k of the candidates."""

    name: ClassVar[str]
    needs_k: ClassVar[bool]  # True when the scores themselves depend on k (eas, uniform)

    def score(self, ctx: CriterionContext) -> tuple[list[float], dict[str, Any]]:
        """Per-layer scores (length num_layers) and criterion-specific details (JSON-ready)."""
        ...

    def select(self, scores: Sequence[float], k: int, candidates: Sequence[int]) -> tuple[int, ...]:
        ...


def top_k(scores: Sequence[float], k: int, candidates: Sequence[int]) -> tuple[int, ...]:
    """The k candidates with the highest scores; ties go to the deeper layer (the depth prior of §14)."""
    if k > len(candidates):
        raise ValueError(f"cannot skip {k} layers: only {len(candidates)} candidates ({list(candidates)})")
    ranked = sorted(candidates, key=lambda i: (scores[i], i), reverse=True)
    return tuple(sorted(ranked[:k]))


def candidate_layers(num_layers: int, include_layer0: bool = False) -> tuple[int, ...]:
    """Layers whose attention may be skipped. Layer 0 is excluded by default: it drives the KV cache's
    bookkeeping (transformers-notes.md §5) and is rarely redundant."""
    return tuple(range(0 if include_layer0 else 1, num_layers))


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a criterion available by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_criterion(name: str) -> Criterion:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def _load_builtins() -> None:
    # Imported here, not at module top: each module registers itself on import and some are heavy.
    from eas.conversion.criteria import bandit, baselines, cosine, kl, recovery  # noqa: F401


def run_criterion(name: str, ctx: CriterionContext) -> CriterionResult:
    """Score with criterion `name` and, when ctx.k is set, build the plan (with the source fingerprint)."""
    criterion = get_criterion(name)
    if ctx.k is not None and not 0 < ctx.k <= len(ctx.candidates):
        raise ValueError(f"skip count {ctx.k} is outside 1..{len(ctx.candidates)} (the candidate layers)")
    if criterion.needs_k and ctx.k is None:
        raise ValueError(f"criterion {name!r} needs a skip budget")
    fingerprint = model_fingerprint(ctx.model)
    scores, details = criterion.score(ctx)
    if len(scores) != ctx.num_layers:
        raise RuntimeError(f"criterion {name!r} returned {len(scores)} scores for {ctx.num_layers} layers")
    if model_fingerprint(ctx.model) != fingerprint:  # a criterion must never change the source
        raise RuntimeError(f"criterion {name!r} modified the source model")
    scores_t = tuple(float(s) for s in scores)
    plan = None
    if ctx.k is not None:
        skipped = criterion.select(scores_t, ctx.k, ctx.candidates)
        plan = SkipPlan(skipped=skipped, num_layers=ctx.num_layers, criterion=name, scores=scores_t,
                        fingerprint=fingerprint)
    return CriterionResult(criterion=name, scores=scores_t, plan=plan, details=details)
