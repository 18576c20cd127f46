"""Data-free control baselines (eas-method.md §14, "Uniform / depth prior"): what a criterion must beat."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from eas.conversion.criteria import CriterionContext, register, top_k


def evenly_spaced(k: int, candidates: Sequence[int]) -> tuple[int, ...]:
    """k candidates spread evenly over the candidate range: the centre of each of k equal bins."""
    if not 0 < k <= len(candidates):
        raise ValueError(f"cannot pick {k} of {len(candidates)} candidates")
    n = len(candidates)
    return tuple(sorted({candidates[min(n - 1, int((j + 0.5) * n / k))] for j in range(k)}))


@register
class Uniform:
    """Skip k evenly spaced layers (Unified Layer Skipping). Its scores are 1 on the chosen layers and 0
    elsewhere: the choice depends on k, not on any measurement."""

    name: ClassVar[str] = "uniform"
    needs_k: ClassVar[bool] = True

    def score(self, ctx: CriterionContext) -> tuple[list[float], dict[str, Any]]:
        chosen = set(evenly_spaced(ctx.k, ctx.candidates))
        return [1.0 if i in chosen else 0.0 for i in range(ctx.num_layers)], {}

    def select(self, scores: Sequence[float], k: int, candidates: Sequence[int]) -> tuple[int, ...]:
        return evenly_spaced(k, candidates)


@register
class Deepest:
    """Skip the k deepest layers (the depth prior: late attention is often the most redundant; the
    released LaVIN-EAS plan is layers 19 and 21–31 of 32). Score = depth / (L − 1)."""

    name: ClassVar[str] = "deepest"
    needs_k: ClassVar[bool] = False

    def score(self, ctx: CriterionContext) -> tuple[list[float], dict[str, Any]]:
        last = max(ctx.num_layers - 1, 1)
        return [i / last for i in range(ctx.num_layers)], {}

    def select(self, scores: Sequence[float], k: int, candidates: Sequence[int]) -> tuple[int, ...]:
        return top_k(scores, k, candidates)
