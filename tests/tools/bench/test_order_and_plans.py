"""A/B interleaving and the benchmark's skip plans."""

from __future__ import annotations

import pytest

from eas_tools.bench.interleave import ab_order, interleaved
from eas_tools.bench.skips import bench_plan, choose_skipped, skip_count_for


def test_order_alternates_every_repetition() -> None:
    assert [ab_order(rep, ["A", "B"]) for rep in range(4)] == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]
    assert [v for _, v in interleaved(3, ["A", "B"])] == ["A", "B", "B", "A", "A", "B"]
    # every repetition measures every variant exactly once, and each variant goes first equally often
    pairs = list(interleaved(10, ["A", "B"]))
    firsts = [pairs[2 * r][1] for r in range(10)]
    assert firsts.count("A") == firsts.count("B") == 5


def test_deepest_and_even_placements_keep_layer_0() -> None:
    assert choose_skipped(12, 6, "deepest") == (6, 7, 8, 9, 10, 11)
    assert choose_skipped(12, 6, "even") == (1, 3, 5, 7, 9, 11)
    assert choose_skipped(32, 12, "even") == tuple(sorted(set(choose_skipped(32, 12, "even"))))
    assert len(choose_skipped(32, 16, "even")) == 16 and 0 not in choose_skipped(32, 31, "even")
    assert choose_skipped(12, 0) == ()


def test_counts_from_fractions_and_limits() -> None:
    assert skip_count_for(12, fraction=0.5) == 6
    assert skip_count_for(32, count=12) == 12
    assert skip_count_for(12, fraction=0.25) == 3
    with pytest.raises(ValueError, match="layer 0"):
        skip_count_for(12, count=12)
    with pytest.raises(ValueError, match="exactly one"):
        skip_count_for(12, fraction=0.5, count=3)
    plan = bench_plan(32, count=16, placement="deepest")
    assert plan.skipped == tuple(range(16, 32)) and plan.num_layers == 32
