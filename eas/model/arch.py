"""Find the language decoder of a supported model and check that EAS can be applied to it.

One small table maps each model class to the attribute path of its text decoder; every supported
decoder layer then exposes the same generic sub-layers (`input_layernorm`, `self_attn`,
`post_attention_layernorm`, `mlp.gate_proj/up_proj/down_proj`). Anything else is refused with a
reason, before anything is modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

# class name -> dotted path of the text decoder module (the one that owns `.layers`).
DECODER_PATHS: dict[str, str] = {
    "LlavaForConditionalGeneration": "model.language_model",
    "Qwen2VLForConditionalGeneration": "model.language_model",
    "Qwen2_5_VLForConditionalGeneration": "model.language_model",
    "Idefics3ForConditionalGeneration": "model.text_model",
    "SmolVLMForConditionalGeneration": "model.text_model",
    # Text-only decoders: the same layer classes, used by unit tests and text-only deployments.
    "LlamaForCausalLM": "model",
    "Qwen2ForCausalLM": "model",
}

_REQUIRED_CHILDREN = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_REQUIRED_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


class UnsupportedModelError(ValueError):
    """The model cannot be converted; the message names the reason."""


@dataclass(frozen=True)
class Decoder:
    """The text decoder of a supported model, located once."""

    family: str
    module: nn.Module
    layers: nn.ModuleList
    text_config: PretrainedConfig

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def effective_gain(norm: nn.Module) -> torch.Tensor:
    """The element-wise gain an RMSNorm applies: `weight`, or `1 + weight` for Gemma-style norms."""
    weight = norm.weight
    return 1.0 + weight if "Gemma" in type(norm).__name__ else weight


def check_layer(index: int, layer: nn.Module, *, converted_ok: bool = False) -> None:
    """Refuse layers that are not pre-norm blocks with a gated (SwiGLU-style) FFN."""
    if converted_ok and getattr(layer, "eas_skipped", False):
        return
    for name in _REQUIRED_CHILDREN:
        if not hasattr(layer, name):
            reason = {
                "input_layernorm": "it has no input_layernorm: post-LN blocks cannot be folded",
                "mlp": "it has no `mlp` feed-forward module",
            }.get(name, f"it has no `{name}` sub-layer")
            raise UnsupportedModelError(f"decoder layer {index} ({type(layer).__name__}): {reason}")
    for name in _REQUIRED_MLP:
        if not hasattr(layer.mlp, name):
            raise UnsupportedModelError(
                f"decoder layer {index}: mlp has no `{name}`: only gated (gate/up/down) FFNs can absorb a PIA"
            )
    if "LayerNorm" in type(layer.input_layernorm).__name__ and "RMS" not in type(layer.input_layernorm).__name__:
        raise UnsupportedModelError(f"decoder layer {index}: input_layernorm is a LayerNorm, not an RMSNorm")


def locate_decoder(model: PreTrainedModel) -> Decoder:
    """The text decoder of `model`, or UnsupportedModelError naming why it cannot be converted."""
    family = type(model).__name__
    path = DECODER_PATHS.get(family)
    if path is None:
        supported = ", ".join(sorted(DECODER_PATHS))
        raise UnsupportedModelError(f"unsupported model class {family}; supported: {supported}")
    try:
        module = _resolve(model, path)
    except AttributeError as exc:
        raise UnsupportedModelError(f"{family}: expected its text decoder at `{path}`") from exc
    layers = getattr(module, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(f"{family}: `{path}.layers` is not a list of decoder layers")
    for index, layer in enumerate(layers):
        check_layer(index, layer, converted_ok=True)
    config = model.config.get_text_config(decoder=True)
    return Decoder(family=family, module=module, layers=layers, text_config=config)
