"""Recoverability: how well a short adapter training stands in for each layer's attention.

For every candidate layer ℓ, a copy of the source model is converted with the one-layer plan [ℓ] and
trained exactly as stage 2 would train it (`train_plan`: PIA for ℓ, kept-layer adapters elsewhere, base
frozen), only for `recovery.steps` steps at `recovery.lr` (default: the reference rule, whatever the
request's stage-2 lr); the score is **−L_ℓ**, the held-out answer loss after that training (higher = more
redundant). Every probe uses the same seed, so the same adapter initialisation and
the same training batches: the layers differ only in which attention was removed.

Why not the immediate harm (`kl`, `cosine`, or the loss with untrained adapters): on the embedded demo
model the layer whose removal hurts most *before* training recovers best *after* it, and the criteria that
measure the immediate harm pick a plan 1.5 points worse (docs/conversion.md, "Recoverability"). The held-out
loss of each probe before training is recorded too (`details["untrained_loss"]`), so the two rankings can
be compared.

Layers are probed one at a time, so the score assumes the costs of skipping several layers roughly add up.
Cost: |candidates| × `recovery.steps` training steps and two held-out passes per candidate; layers that
are not candidates are not probed and get the lowest probed score (they are never chosen).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from eas.conversion.criteria import CriterionContext, register, top_k
from eas.conversion.errors import check_cancel
from eas.conversion.training import TrainingConfig, train_plan
from eas.model.plan import SkipPlan


@register
class Recovery:
    name: ClassVar[str] = "recovery"
    needs_k: ClassVar[bool] = False

    def score(self, ctx: CriterionContext) -> tuple[list[float], dict[str, Any]]:
        settings = ctx.recovery
        held_out = ctx.data.validation[: settings.held_out_rows]
        if not held_out:
            raise ValueError("the recovery criterion needs held-out validation rows to measure each probe")
        cfg = TrainingConfig(steps=settings.steps, batch_size=ctx.batch_size, lr=settings.lr, seed=ctx.seed)
        recovered: dict[int, float] = {}
        untrained: dict[int, float] = {}
        probes = len(ctx.candidates)
        for j, layer in enumerate(ctx.candidates):
            check_cancel(ctx.cancel, "recovery criterion")
            # A private copy: train_plan converts in place, and a criterion must leave the source untouched.
            probe = copy.deepcopy(ctx.model)

            def progress(fraction: float, message: str, j: int = j, layer: int = layer) -> None:
                ctx.report((j + fraction) / probes, f"recovery: layer {layer} ({j + 1}/{probes}), {message}")

            report = train_plan(probe, ctx.processor, SkipPlan(skipped=(layer,), num_layers=ctx.num_layers),
                                ctx.adapters, ctx.data.train, held_out, cfg, cancel=ctx.cancel,
                                progress=progress, show_bar=ctx.show_bar)
            del probe
            recovered[layer] = float(report.val_loss_after)
            untrained[layer] = float(report.val_loss_before)
            ctx.report((j + 1) / probes, f"recovery: layer {layer} held-out loss {untrained[layer]:.4f} untrained "
                                         f"-> {recovered[layer]:.4f} after {settings.steps} steps")
        floor = min(-loss for loss in recovered.values())
        scores = [-recovered[i] if i in recovered else floor for i in range(ctx.num_layers)]
        details = {"recovered_loss": {str(i): v for i, v in recovered.items()},
                   "untrained_loss": {str(i): v for i, v in untrained.items()},
                   "held_out_rows": len(held_out), "settings": settings.model_dump(mode="json")}
        return scores, details

    def select(self, scores, k, candidates):
        return top_k(scores, k, candidates)
