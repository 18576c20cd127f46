"""Leave-one-out KL divergence (FinerCut / VTW / ShortV; eas-method.md §14).

D_ℓ = E_x KL( p(·|x) ‖ p_{−Attn_ℓ}(·|x) ) at the answer position (the next-token distribution after the
prompt, i.e. the first answer token), over the calibration samples. Removing Attn_ℓ means zeroing the
attention sub-layer's output, so block ℓ computes x + FFN(LN(x)): the plain "delete attention" ablation,
without an adapter. A small D_ℓ means the answer hardly depends on that attention, so the score is
**−D_ℓ** (higher = more redundant), which keeps one convention for every criterion. L + 1 forward passes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from eas.conversion.criteria import CriterionContext, register, top_k
from eas.conversion.criteria.cosine import prompt_batches
from eas.conversion.errors import check_cancel
from eas.model.arch import locate_decoder


def _zero_attention(_module, _args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


@register
class KL:
    name: ClassVar[str] = "kl"
    needs_k: ClassVar[bool] = False

    @torch.no_grad()
    def score(self, ctx: CriterionContext) -> tuple[list[float], dict[str, Any]]:
        model = ctx.model.eval()
        layers = locate_decoder(model).layers
        batches = list(prompt_batches(ctx))
        reference = [F.log_softmax(model(**b, use_cache=False).logits[:, -1].float(), dim=-1) for b in batches]
        n = sum(r.shape[0] for r in reference)
        divergences = []
        for i, layer in enumerate(layers):
            check_cancel(ctx.cancel, "kl criterion")
            handle = layer.self_attn.register_forward_hook(_zero_attention)
            try:
                total = 0.0
                for batch, log_p in zip(batches, reference, strict=True):
                    log_q = F.log_softmax(model(**batch, use_cache=False).logits[:, -1].float(), dim=-1)
                    total += float((log_p.exp() * (log_p - log_q)).sum())
            finally:
                handle.remove()
            divergences.append(total / n)
            ctx.report((i + 1) / len(layers), f"kl: layer {i + 1}/{len(layers)} KL {divergences[-1]:.4g}")
        return [-d for d in divergences], {"kl": divergences, "samples": n}

    def select(self, scores, k, candidates):
        return top_k(scores, k, candidates)
