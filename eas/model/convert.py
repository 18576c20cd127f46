"""Apply a skip plan to a model: drop attention, insert PIA / kept-layer adapters, freeze the base.

`apply_plan` validates everything before it touches the model, so a refused model is left unchanged.
The converted model keeps its class; the plan and adapter settings are recorded in the text config
(`text_config.eas`) so that a saved model can be rebuilt exactly on load.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from eas.model.adapters import PIA, AdapterConfig, RoutedAdapter
from eas.model.arch import locate_decoder
from eas.model.layers import AdaptedNorm, MergedSkippedLayer, SkippedLayer
from eas.model.plan import SkipPlan
from eas.model.pooling import PoolingState, install_hook

CONFIG_KEY = "eas"


class ConversionError(ValueError):
    """The conversion cannot be applied as asked."""


@dataclass
class EASRuntime:
    """What a converted model carries at run time besides its modules."""

    plan: SkipPlan
    adapters: AdapterConfig
    merged: bool
    state: PoolingState


def eas_runtime(model: nn.Module) -> EASRuntime | None:
    return getattr(model, "_eas_runtime", None)


def apply_plan(
    model: PreTrainedModel,
    plan: SkipPlan,
    adapters: AdapterConfig | None = None,
    *,
    merged: bool = False,
    train_projector: bool = False,
    check_fingerprint: bool = True,
) -> PreTrainedModel:
    """Convert `model` in place and return it.

    merged=False builds the trainable adapter form; merged=True builds the empty folded structure
    that a saved merged model's tensors are loaded into (eas.model.fold makes it from trained adapters).
    """
    adapters = adapters or AdapterConfig()
    if eas_runtime(model) is not None:
        raise ConversionError("model is already converted")
    decoder = locate_decoder(model, probe=True)
    plan.check_model(model, decoder.num_layers, check_fingerprint=check_fingerprint)
    hidden = decoder.text_config.hidden_size
    adapters.check_hidden(hidden)
    if merged and adapters.router:
        raise ConversionError("a routed PIA has per-sample weights and cannot be served folded (router=False)")

    state = PoolingState()
    replacements: dict[int, nn.Module] = {}
    for i in plan.skipped:
        layer = decoder.layers[i]
        if merged:
            replacements[i] = MergedSkippedLayer(layer, state, i, adapters.pia_rank)
        else:
            replacements[i] = SkippedLayer(layer, PIA(hidden, adapters), state, i)
    kept_norms: dict[int, nn.Module] = {}
    if adapters.kept_adapters and not merged:
        for i in plan.kept:
            norm = decoder.layers[i].input_layernorm
            kept_norms[i] = AdaptedNorm(norm, RoutedAdapter(hidden, adapters), state, f"kept{i}")

    # Nothing above touched the model; from here on it is modified.
    for param in model.parameters():
        param.requires_grad_(False)
    for i, module in replacements.items():
        decoder.layers[i] = module
    for i, norm in kept_norms.items():
        decoder.layers[i].input_layernorm = norm
    if adapters.kept_adapters and merged:
        for i in plan.kept:
            add_qkv_bias(decoder.layers[i].self_attn)
    for module in replacements.values():
        if isinstance(module, SkippedLayer):
            module.pia.requires_grad_(True)
    for norm in kept_norms.values():
        norm.adapter.requires_grad_(True)
    if train_projector and hasattr(model.model, "multi_modal_projector"):
        model.model.multi_modal_projector.requires_grad_(True)

    setattr(decoder.text_config, CONFIG_KEY, {
        "plan": plan.model_dump(mode="json"),
        "adapters": adapters.model_dump(mode="json"),
        "merged": merged,
    })
    model._eas_runtime = EASRuntime(plan=plan, adapters=adapters, merged=merged, state=state)
    install_hook(model, state)
    return model


def add_qkv_bias(attn: nn.Module) -> None:
    """Give q/k/v projections a bias (zeros) where they have none: a kept-layer fold needs one.
    Llama's `attention_bias` is global, so the modules are replaced rather than the flag flipped."""
    for name in ("q_proj", "k_proj", "v_proj"):
        proj: nn.Linear = getattr(attn, name)
        if proj.bias is not None:
            continue
        new = nn.Linear(proj.in_features, proj.out_features, bias=True,
                        device=proj.weight.device, dtype=proj.weight.dtype)
        new.weight.data.copy_(proj.weight.data)
        new.bias.data.zero_()
        new.weight.requires_grad_(False)
        new.bias.requires_grad_(False)
        setattr(attn, name, new)


def stored_conversion(config) -> tuple[SkipPlan, AdapterConfig, bool] | None:
    """(plan, adapter config, merged) recorded in a model config, or None for a plain model."""
    text = config.get_text_config(decoder=True)
    raw = getattr(text, CONFIG_KEY, None)
    if not raw:
        return None
    return SkipPlan.model_validate(raw["plan"]), AdapterConfig.model_validate(raw["adapters"]), bool(raw["merged"])
