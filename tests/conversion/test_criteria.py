"""Every criterion scores all layers and, with a budget, returns a valid plan for the source model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eas.conversion.criteria import (
    CriterionContext,
    RecoverySettings,
    SearchSettings,
    available,
    candidate_layers,
    run_criterion,
    top_k,
)
from eas.conversion.criteria.baselines import evenly_spaced
from eas.conversion.data import batches, load_dataset, training_batch
from eas.model.arch import locate_decoder
from eas.model.plan import model_fingerprint
from eas.zoo.llava import build_llava


def _context(jsonl: Path, k: int | None, include_layer0: bool = False) -> CriterionContext:
    model, processor = build_llava(seed=0)
    data = load_dataset(jsonl, val_size=8)
    return CriterionContext(
        model=model, processor=processor, num_layers=4, candidates=candidate_layers(4, include_layer0), k=k,
        data=data, calibration_samples=8, batch_size=8,
        search=SearchSettings(steps=8, n_turn=2, warmup_fraction=0.25, reward_batch_size=4),
        recovery=RecoverySettings(steps=3), show_bar=False,
    )


@pytest.mark.parametrize("name", ["eas", "cosine", "kl", "recovery", "uniform", "deepest"])
def test_each_criterion_returns_a_valid_plan(name: str, shapes_jsonl: Path) -> None:
    ctx = _context(shapes_jsonl, k=2)
    state = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in ctx.model.named_parameters()}
    result = run_criterion(name, ctx)
    plan = result.plan
    assert plan is not None and plan.criterion == name
    assert len(plan.skipped) == 2 and set(plan.skipped) <= {1, 2, 3}  # layer 0 excluded by default
    assert plan.scores == result.scores and len(plan.scores) == 4
    assert all(isinstance(s, float) for s in plan.scores)
    assert plan.fingerprint == model_fingerprint(ctx.model)
    # the plan is the top of the scores among the candidates (uniform: its own evenly spaced rule)
    if name != "uniform":
        assert plan.skipped == top_k(plan.scores, 2, (1, 2, 3))
    # the source model is left exactly as it was (modules and weights)
    after = ctx.model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in ctx.model.named_parameters()} == flags


def test_registry_lists_the_builtin_criteria() -> None:
    assert {"eas", "cosine", "kl", "recovery", "uniform", "deepest"} <= set(available())


def test_scores_without_budget_and_layer0_option(shapes_jsonl: Path) -> None:
    ctx = _context(shapes_jsonl, k=None, include_layer0=True)
    result = run_criterion("cosine", ctx)
    assert result.plan is None and len(result.scores) == 4
    assert all(-1.0 <= s <= 1.0 for s in result.scores)  # cosine similarities
    ctx.k = 3
    plan = run_criterion("kl", ctx).plan
    assert len(plan.skipped) == 3  # 3 of 4 layers: only possible with layer 0 a candidate


def test_kl_scores_are_negative_divergences(shapes_jsonl: Path) -> None:
    result = run_criterion("kl", _context(shapes_jsonl, k=1))
    assert all(s <= 1e-9 for s in result.scores)
    assert result.details["kl"] == pytest.approx([-s for s in result.scores])


def test_budget_needed_by_eas_and_uniform(shapes_jsonl: Path) -> None:
    for name in ("eas", "uniform"):
        with pytest.raises(ValueError, match="needs a skip budget"):
            run_criterion(name, _context(shapes_jsonl, k=None))


def test_eas_search_records_bandit_rounds(shapes_jsonl: Path) -> None:
    result = run_criterion("eas", _context(shapes_jsonl, k=2))
    details = result.details
    assert details["rounds"] == 3  # steps 4 (after a warm-up of 2), 6 and 8
    assert all(len(r["subsets"]) == 3 and len(r["losses"]) == 3 for r in details["history"])
    assert len(details["search_curve"]["loss"]) == 8


def test_eas_refuses_a_search_without_rounds(shapes_jsonl: Path) -> None:
    ctx = _context(shapes_jsonl, k=2)
    ctx.search = SearchSettings(steps=4, n_turn=10)
    with pytest.raises(ValueError, match="no bandit update"):
        run_criterion("eas", ctx)


def test_baseline_rules() -> None:
    assert evenly_spaced(16, tuple(range(1, 32))) == tuple(range(1, 32, 2))
    assert evenly_spaced(3, tuple(range(1, 32))) == (6, 16, 26)
    assert top_k([0.0, 0.5, 0.5, 0.1], 1, (1, 2, 3)) == (2,)  # ties go to the deeper layer


def _source_with_dead_attention(jsonl: Path, dead: tuple[int, ...]) -> CriterionContext:
    """A tiny source trained on the shapes data whose layers `dead` have an attention that outputs zero
    (o_proj zero and frozen during training): skipping those is exactly free, so they are the known
    recoverable layers; the other layers' attention was trained and the answers depend on it."""
    ctx = _context(jsonl, k=len(dead))
    model, processor = ctx.model, ctx.processor
    for i in dead:
        locate_decoder(model).layers[i].self_attn.o_proj.weight.data.zero_()
        locate_decoder(model).layers[i].self_attn.o_proj.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    stream = batches(ctx.data.train, 8, 0)
    model.train()
    for _ in range(60):  # a random model's loss is ~log(vocab) whatever is skipped: train it first
        model(**training_batch(processor, next(stream)), use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().requires_grad_(False)
    ctx.recovery = RecoverySettings(steps=20, lr=1e-2)
    return ctx


@pytest.mark.parametrize("dead", [(1, 3), (1, 2)])
def test_recovery_picks_the_layers_whose_skip_is_recoverable(dead: tuple[int, ...], shapes_jsonl: Path) -> None:
    # Two plantings: the plan follows the planted layers, not depth or index (each is the other's control).
    result = run_criterion("recovery", _source_with_dead_attention(shapes_jsonl, dead))
    assert result.plan.skipped == dead
    recovered = {int(k): v for k, v in result.details["recovered_loss"].items()}
    untrained = {int(k): v for k, v in result.details["untrained_loss"].items()}
    assert set(recovered) == set(untrained) == {1, 2, 3}  # every candidate probed, layer 0 not
    assert result.scores[1:] == tuple(-recovered[i] for i in (1, 2, 3))
    assert result.scores[0] == min(result.scores[1:])  # a non-candidate is never ranked above a probed layer
    assert all(recovered[i] < untrained[i] for i in dead)  # the probes trained


def test_recovery_needs_held_out_rows(shapes_jsonl: Path) -> None:
    ctx = _context(shapes_jsonl, k=1)
    ctx.data.validation = []
    with pytest.raises(ValueError, match="held-out validation rows"):
        run_criterion("recovery", ctx)


def test_recovery_probes_use_their_own_lr(shapes_jsonl: Path) -> None:
    # The request's stage-2 lr (ctx.lr) does not change the measurement; the probe's own lr does.
    base = run_criterion("recovery", _context(shapes_jsonl, k=1)).scores
    ctx = _context(shapes_jsonl, k=1)
    ctx.lr = 0.5
    assert run_criterion("recovery", ctx).scores == base
    ctx.recovery = RecoverySettings(steps=3, lr=0.05)
    assert run_criterion("recovery", ctx).scores != base
