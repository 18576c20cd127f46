"""Attention input/output cosine similarity (LLM-Drop; eas-method.md §14).

sim_ℓ = E_t cos(x_t, x_t + Attn_ℓ(LN(x_t))), averaged over every non-padding prompt token of the
calibration samples (image tokens included). An attention sub-layer whose output barely turns the
residual stream is redundant, so the score is sim_ℓ itself: skip the highest. One forward pass with hooks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from eas.conversion.criteria import CriterionContext, register, top_k
from eas.conversion.data import fixed_batches, load_images
from eas.conversion.errors import check_cancel
from eas.model.arch import locate_decoder
from eas.model.loading import LoadedModel


def prompt_batches(ctx: CriterionContext):
    """Left-padded prompt batches of the calibration rows, built exactly as serving builds them."""
    param = next(ctx.model.parameters())
    loaded = LoadedModel(model=ctx.model, processor=ctx.processor, device=param.device, dtype=param.dtype)
    for chunk in fixed_batches(ctx.calibration(), ctx.batch_size):
        yield loaded.prepare(load_images(chunk), [s.question for s in chunk])


@register
class Cosine:
    name: ClassVar[str] = "cosine"
    needs_k: ClassVar[bool] = False

    @torch.no_grad()
    def score(self, ctx: CriterionContext) -> tuple[list[float], dict[str, Any]]:
        layers = locate_decoder(ctx.model).layers
        sums = torch.zeros(len(layers), dtype=torch.float64)
        count = 0
        inputs: dict[int, torch.Tensor] = {}
        mask_box: dict[str, torch.Tensor] = {}
        handles = []

        def capture_input(i: int):
            def hook(_module, args, kwargs):
                inputs[i] = args[0] if args else kwargs["hidden_states"]
            return hook

        def measure(i: int):
            def hook(_module, _args, output):
                x = inputs.pop(i).float()
                attn = (output[0] if isinstance(output, tuple) else output).float()
                cos = F.cosine_similarity(x, x + attn, dim=-1)  # [B, N]
                mask = mask_box["mask"]
                sums[i] += float((cos * mask).sum())
            return hook

        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(capture_input(i), with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(measure(i)))
        ctx.model.eval()
        try:
            batches = list(prompt_batches(ctx))
            for b, batch in enumerate(batches):
                check_cancel(ctx.cancel, "cosine criterion")
                mask_box["mask"] = batch["attention_mask"].float()
                count += int(batch["attention_mask"].sum())
                ctx.model(**batch, use_cache=False)
                ctx.report((b + 1) / len(batches), f"cosine: batch {b + 1}/{len(batches)}")
        finally:
            for handle in handles:
                handle.remove()
        sims = (sums / max(count, 1)).tolist()
        return sims, {"similarity": sims, "tokens": count}

    def select(self, scores, k, candidates):
        return top_k(scores, k, candidates)
