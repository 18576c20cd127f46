"""The EAS redundancy search: a multi-armed bandit over attention sub-layers (eas-method.md §6).

`GradientBandit` is the pure update logic (testable on a synthetic loss); `EAS` runs it on the supernet:

- state H ∈ R^L (0 at start); policy π = softmax(β·H) over the candidates (β = 10, LaVIN);
- each training step draws S_t ~ π, k = K indices *without replacement* (each draw ∝ π over the
  remaining indices), skips S_t in the supernet and trains every active adapter on the batch;
- every n_turn steps after warm-up: draw n subsets from the current π, compute each one's loss L_j with
  no grad on a **held-out** batch (the same batch for the n subsets of a round), R_j = exp(−L_j),
  R̄ = mean_j R_j, and for every j and i ∈ S_j: H_i ← H_i + η (R_j − R̄) π_i (1 − π_i), with the π the
  subsets were drawn from;
- plan = top-K of H (higher H = more redundant). Draws come from a seeded generator.

Single process: the cross-rank average of H is the identity (world size 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from eas.conversion.criteria import CriterionContext, register, top_k
from eas.conversion.data import fixed_batches, to_device, training_batch
from eas.conversion.errors import check_cancel
from eas.conversion.supernet import Supernet
from eas.conversion.training import TrainingConfig, model_device_dtype, run_steps, set_adapter_training


class GradientBandit:
    """H, π = softmax(β·H) over the candidates, seeded subset draws and the EAS update rule."""

    def __init__(self, num_layers: int, candidates: Sequence[int], k: int, *, beta: float = 10.0,
                 eta: float = 2.0, seed: int = 0) -> None:
        if not 0 < k <= len(candidates):
            raise ValueError(f"subset size {k} is outside 1..{len(candidates)}")
        self.num_layers = num_layers
        self.candidates = tuple(candidates)
        self.k = k
        self.beta = beta
        self.eta = eta
        self.H = torch.zeros(num_layers, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        self.rounds = 0

    def policy(self) -> torch.Tensor:
        """π over all layers (0 outside the candidates)."""
        pi = torch.zeros(self.num_layers, dtype=torch.float64)
        idx = torch.tensor(self.candidates)
        pi[idx] = torch.softmax(self.beta * self.H[idx], dim=0)
        return pi

    def draw(self, pi: torch.Tensor | None = None) -> tuple[int, ...]:
        """k distinct layers; each successive draw ∝ π over the layers not drawn yet."""
        weights = (self.policy() if pi is None else pi).clone()
        chosen = []
        for _ in range(self.k):
            index = int(torch.multinomial(weights / weights.sum(), 1, generator=self.generator))
            chosen.append(index)
            weights[index] = 0.0
        return tuple(sorted(chosen))

    def update(self, subsets: Sequence[Sequence[int]], losses: Sequence[float], pi: torch.Tensor) -> list[float]:
        """One bandit round from the subsets drawn under `pi` and their held-out losses; returns R_j."""
        rewards = [math.exp(-loss) for loss in losses]
        mean = sum(rewards) / len(rewards)
        for subset, reward in zip(subsets, rewards, strict=True):
            for i in subset:
                self.H[i] += self.eta * (reward - mean) * pi[i] * (1.0 - pi[i])
        self.rounds += 1
        return rewards

    def round(self, loss_of: Callable[[tuple[int, ...]], float], n_subsets: int) -> dict[str, Any]:
        """Draw n subsets from the current π, score each with `loss_of`, update H."""
        pi = self.policy()
        subsets = [self.draw(pi) for _ in range(n_subsets)]
        losses = [float(loss_of(s)) for s in subsets]
        rewards = self.update(subsets, losses, pi)
        return {"subsets": [list(s) for s in subsets], "losses": losses, "rewards": rewards}

    def top_k(self, k: int | None = None) -> tuple[int, ...]:
        return top_k(self.H.tolist(), self.k if k is None else k, self.candidates)


@register
class EAS:
    """Supernet training with bandit-driven skipping; scores = H after the search."""

    name: ClassVar[str] = "eas"
    needs_k: ClassVar[bool] = True

    def score(self, ctx: CriterionContext) -> tuple[list[float], dict[str, Any]]:
        settings = ctx.search
        if not ctx.data.validation:
            raise ValueError("the eas search needs held-out validation rows for its rewards")
        bandit = GradientBandit(ctx.num_layers, ctx.candidates, ctx.k, beta=settings.beta, eta=settings.eta,
                                seed=ctx.seed)
        cfg = TrainingConfig(steps=settings.steps, batch_size=ctx.batch_size, lr=ctx.lr, seed=ctx.seed)
        reward_batches = fixed_batches(ctx.data.validation, settings.reward_batch_size)
        warmup = int(settings.steps * settings.warmup_fraction)
        if settings.steps // settings.n_turn * settings.n_turn <= warmup:
            raise ValueError(
                f"the eas search would make no bandit update: {settings.steps} steps with a warm-up of {warmup} "
                f"and a round every {settings.n_turn} steps; raise the search steps or lower n_turn"
            )
        history: list[dict[str, Any]] = []
        torch.manual_seed(ctx.seed)  # adapter initialisation and dropout
        with Supernet(ctx.model, ctx.candidates, ctx.adapters) as net:
            device, dtype = model_device_dtype(ctx.model)

            @torch.no_grad()
            def held_out_loss(subset: tuple[int, ...], batch: dict[str, torch.Tensor]) -> float:
                net.set_skipped(subset)
                set_adapter_training(ctx.model, False)
                return float(ctx.model(**batch, use_cache=False).loss)

            def before_step(step: int) -> None:
                net.set_skipped(bandit.draw())

            def after_step(step: int, loss: float) -> None:
                done = step + 1
                if done <= warmup or done % settings.n_turn:
                    return
                check_cancel(ctx.cancel, "bandit round")
                chunk = reward_batches[bandit.rounds % len(reward_batches)]
                batch = to_device(training_batch(ctx.processor, chunk), device, dtype)
                record = bandit.round(lambda s: held_out_loss(s, batch), settings.n_subsets)
                record["step"] = done
                record["H"] = [round(h, 6) for h in bandit.H.tolist()]
                history.append(record)

            curve = run_steps(ctx.model, ctx.processor, ctx.data.train, cfg, cancel=ctx.cancel,
                              progress=ctx.progress, before_step=before_step, after_step=after_step,
                              description="eas search", show_bar=ctx.show_bar)
        scores = bandit.H.tolist()
        details = {"rounds": bandit.rounds, "history": history, "search_curve": curve.to_dict(),
                   "policy": bandit.policy().tolist(), "settings": settings.model_dump(mode="json")}
        return scores, details

    def select(self, scores, k, candidates):
        return top_k(scores, k, candidates)
