"""The bandit's update logic as a pure object (eas-method.md §6, §13 test 14)."""

from __future__ import annotations

import math

import pytest
import torch

from eas.conversion.criteria.bandit import GradientBandit


def test_finds_planted_cheap_layers_on_a_synthetic_loss() -> None:
    # L(S) = Σ_{i∈S} c_i: three cheap layers among eleven candidates; K = 3.
    costs = {i: 1.0 for i in range(1, 12)}
    cheap = (3, 7, 10)
    for i in cheap:
        costs[i] = 0.1
    bandit = GradientBandit(12, candidates=range(1, 12), k=3, beta=10.0, eta=2.0, seed=0)
    for _ in range(400):
        bandit.round(lambda subset: sum(costs[i] for i in subset), n_subsets=3)
    assert bandit.top_k() == cheap
    assert bandit.H[0] == 0.0  # layer 0 is not a candidate: never drawn, never updated
    assert float(bandit.policy()[list(cheap)].sum()) > 0.9  # π concentrates on the cheap layers


def test_update_rule_matches_the_reference_formula() -> None:
    bandit = GradientBandit(4, candidates=(1, 2, 3), k=2, beta=10.0, eta=2.0)
    bandit.H[:] = torch.tensor([0.0, 0.05, -0.02, 0.01], dtype=torch.float64)
    pi = bandit.policy()
    subsets, losses = [(1, 2), (2, 3)], [0.5, 1.5]
    before = bandit.H.clone()
    rewards = bandit.update(subsets, losses, pi)
    r = [math.exp(-0.5), math.exp(-1.5)]
    mean = sum(r) / 2
    expected = before.clone()
    for subset, reward in zip(subsets, r, strict=True):
        for i in subset:
            expected[i] += 2.0 * (reward - mean) * pi[i] * (1 - pi[i])
    assert rewards == pytest.approx(r)
    assert torch.allclose(bandit.H, expected, atol=1e-15)
    assert bandit.H[1] > before[1] and bandit.H[3] < before[3]  # the better subset's members gain


def test_policy_is_softmax_of_beta_h_over_candidates() -> None:
    bandit = GradientBandit(5, candidates=(1, 2, 4), k=2, beta=10.0)
    bandit.H[:] = torch.tensor([9.0, 0.1, 0.0, 9.0, -0.1], dtype=torch.float64)
    pi = bandit.policy()
    expected = torch.softmax(10 * torch.tensor([0.1, 0.0, -0.1], dtype=torch.float64), 0)
    assert torch.allclose(pi[[1, 2, 4]], expected)
    assert pi[0] == 0 and pi[3] == 0


def test_draws_are_distinct_candidates_and_seeded() -> None:
    a = GradientBandit(8, candidates=range(1, 8), k=4, seed=3)
    b = GradientBandit(8, candidates=range(1, 8), k=4, seed=3)
    draws_a = [a.draw() for _ in range(50)]
    assert draws_a == [b.draw() for _ in range(50)]
    for subset in draws_a:
        assert len(set(subset)) == 4 and set(subset) <= set(range(1, 8))
    assert len(set(draws_a)) > 5  # a uniform π explores


def test_draw_follows_the_policy() -> None:
    bandit = GradientBandit(4, candidates=(1, 2, 3), k=1, beta=10.0, seed=0)
    bandit.H[3] = 0.3  # π_3 = e^3 / (2 + e^3) ≈ 0.91
    counts = {1: 0, 2: 0, 3: 0}
    for _ in range(2000):
        counts[bandit.draw()[0]] += 1
    assert counts[3] / 2000 == pytest.approx(math.exp(3) / (2 + math.exp(3)), abs=0.03)


def test_rejects_subset_size_outside_candidates() -> None:
    with pytest.raises(ValueError):
        GradientBandit(4, candidates=(1, 2, 3), k=4)
