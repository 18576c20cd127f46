"""Which attention layers a benchmark's EAS variant skips: a count or fraction, placed deepest-first or
evenly spaced. Layer 0 is never chosen: its attention mixes the raw embeddings, and the project's
conversions exclude it by default too (`eas convert --include-layer0`)."""

from __future__ import annotations

from typing import Literal

from eas.model.plan import SkipPlan

Placement = Literal["deepest", "even"]


def skip_count_for(num_layers: int, fraction: float | None = None, count: int | None = None) -> int:
    """The number of layers to skip: `count` as given, else `round(fraction * num_layers)`."""
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of a skip fraction and a skip count")
    if count is None:
        assert fraction is not None
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"skip fraction {fraction} is outside [0, 1)")
        count = round(fraction * num_layers)
    if not 0 <= count <= num_layers - 1:
        raise ValueError(f"cannot skip {count} of {num_layers} layers (layer 0 is always kept)")
    return count


def choose_skipped(num_layers: int, count: int, placement: Placement = "deepest") -> tuple[int, ...]:
    """`count` layer indices out of 1..num_layers-1."""
    candidates = list(range(1, num_layers))
    if not 0 <= count <= len(candidates):
        raise ValueError(f"cannot skip {count} of {num_layers} layers (layer 0 is always kept)")
    if count == 0:
        return ()
    if placement == "deepest":
        return tuple(candidates[-count:])
    if placement == "even":
        # The centre of each of `count` equal slices of the candidates: spread, deterministic, no repeats.
        step = len(candidates) / count
        return tuple(candidates[int((k + 0.5) * step)] for k in range(count))
    raise ValueError(f"unknown placement {placement!r} (deepest or even)")


def bench_plan(num_layers: int, fraction: float | None = None, count: int | None = None,
               placement: Placement = "deepest") -> SkipPlan:
    n = skip_count_for(num_layers, fraction, count)
    return SkipPlan(skipped=choose_skipped(num_layers, n, placement), num_layers=num_layers,
                    criterion=f"bench-{placement}")
