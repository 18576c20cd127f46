"""A/B interleaving: every repetition measures every variant, and the order flips each repetition
(A B, B A, A B, …), so slow drift (thermal, other load, caches) lands on both variants equally and no
variant always runs first, right after the other one warmed the caches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def ab_order(rep: int, items: Sequence[T]) -> list[T]:
    """`items` in order on even repetitions, reversed on odd ones."""
    return list(items) if rep % 2 == 0 else list(reversed(items))


def interleaved(reps: int, items: Sequence[T]) -> Iterator[tuple[int, T]]:
    """(repetition, item) pairs in measuring order."""
    for rep in range(reps):
        for item in ab_order(rep, items):
            yield rep, item
