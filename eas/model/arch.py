"""Find the language decoder of a model by its structure and check that EAS can be applied to it.

No table of model classes: the text decoder is the one module that owns both `embed_tokens` and a
`layers` list (the vision towers own `layers` or `blocks` but no token embedding), preferring the one
whose config is the model's text config when a model holds several. Every layer of it must then be
one of the two block forms EAS can skip exactly (docs/eas-core.md, "Supported families"):

- `pre-norm`  (Llama, Mistral, Qwen2/2.5/3-VL, Gemma 1, ...): input_layernorm, self_attn,
  post_attention_layernorm (the FFN's input norm), mlp.
- `sandwich` (Gemma 2, Gemma 3): the same plus pre_feedforward_layernorm (the FFN's input norm) and
  post_feedforward_layernorm (on the FFN output); post_attention_layernorm normalises the attention
  *output* and disappears with the attention.
- `sandwich (GLM)` (GLM-4V): the same block under GLM's names: post_self_attn_layernorm on the attention
  output, post_attention_layernorm in front of the FFN, post_mlp_layernorm on its output.

The FFN is gated, with separate gate_proj/up_proj or one fused gate_up_proj (gate rows first).

A layer is accepted only if every one of its sub-modules is accounted for by its form, the FFN is
gated (gate/up/down + activation) and, on a model with real weights, a numerical probe agrees: with
the attention's output replaced by zeros, the stock layer computes exactly what the form says, the
attention reads input_layernorm's output, and each norm is an RMSNorm with gain `weight` or
`1 + weight`. Anything else is refused with a reason, before anything is modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class UnsupportedModelError(ValueError):
    """The model cannot be converted; the message names the reason."""


@dataclass(frozen=True)
class BlockForm:
    """How a decoder block of one kind is skipped.

    ffn_norm: the norm in front of the FFN; only its gain g_f survives in the skipped form (it multiplies
    the PIA output). ffn_out_norm: a norm applied to the FFN output, kept as is. dropped: the sub-modules
    that go with the attention.
    """

    name: str
    children: frozenset[str]
    ffn_norm: str
    ffn_out_norm: str | None
    dropped: tuple[str, ...]


PRE_NORM = BlockForm(
    name="pre-norm",
    children=frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}),
    ffn_norm="post_attention_layernorm",
    ffn_out_norm=None,
    dropped=("self_attn",),
)
SANDWICH = BlockForm(
    name="sandwich",
    children=frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm",
                        "post_feedforward_layernorm", "mlp"}),
    ffn_norm="pre_feedforward_layernorm",
    ffn_out_norm="post_feedforward_layernorm",
    dropped=("self_attn", "post_attention_layernorm"),
)
# GLM-4V (and GLM-4.1V/4.5V-style decoders): a sandwich block under other names, with a fused gate/up FFN.
GLM_SANDWICH = BlockForm(
    name="sandwich (GLM)",
    children=frozenset({"input_layernorm", "self_attn", "post_self_attn_layernorm", "post_attention_layernorm",
                        "post_mlp_layernorm", "mlp"}),
    ffn_norm="post_attention_layernorm",
    ffn_out_norm="post_mlp_layernorm",
    dropped=("self_attn", "post_self_attn_layernorm"),
)
FORMS = (PRE_NORM, SANDWICH, GLM_SANDWICH)
# A gated FFN down(act(gate v) ⊙ up v), with separate gate/up projections or one fused gate_up_proj whose
# first half of rows is the gate (transformers' `chunk(2)` order).
_MLP_SPLIT = frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"})
_MLP_FUSED = frozenset({"gate_up_proj", "down_proj", "activation_fn"})


def _mlp_names(mlp: nn.Module) -> set[str]:
    names = {n for n, _ in mlp.named_children()}
    return names | {n for n in ("act_fn", "activation_fn") if hasattr(mlp, n)}


def gate_up_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up weight matrices of a gated FFN ([d_ff, d] each; views of gate_up_proj when fused, so
    writing into them writes the fused weight)."""
    if hasattr(mlp, "gate_up_proj"):
        weight = mlp.gate_up_proj.weight
        half = weight.shape[0] // 2
        return weight[:half], weight[half:]
    return mlp.gate_proj.weight, mlp.up_proj.weight


def gated_ffn(mlp: nn.Module, x: torch.Tensor, b_gate: torch.Tensor | None = None,
              b_up: torch.Tensor | None = None) -> torch.Tensor:
    """down(act(W_g x + b_g) ⊙ (W_u x + b_u)) with the FFN's own modules; biases [B, d_ff] per sample."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        act = mlp.activation_fn
    else:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        act = mlp.act_fn
    if b_gate is not None:
        gate = gate + b_gate[:, None, :]
        up = up + b_up[:, None, :]
    return mlp.down_proj(act(gate) * up)


@dataclass(frozen=True)
class Decoder:
    """The text decoder of a supported model, located once."""

    family: str
    path: str  # dotted path of the decoder module inside the model ("model.language_model")
    module: nn.Module
    layers: nn.ModuleList
    text_config: PretrainedConfig
    forms: tuple[BlockForm, ...]  # per layer; a converted skipped layer reports the form it was made from

    @property
    def num_layers(self) -> int:
        return len(self.layers)


# --- norms -------------------------------------------------------------------------------------------

_GAIN_OFFSET: dict[type, float] = {}


def _rms_probe_input(hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Large, off-centre values: eps is negligible and a LayerNorm (mean removed) cannot pass for an RMSNorm.
    gen = torch.Generator().manual_seed(1234)
    x = 8.0 * torch.randn(3, hidden, generator=gen, dtype=torch.float64) + 3.0
    return x.to(device=device, dtype=dtype)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    a, b = a.detach().double(), b.detach().double()
    scale = max(float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) <= _tolerance(dtype) * scale


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def rms_gain_offset(norm: nn.Module) -> float | None:
    """0 when `norm` computes weight ⊙ x/rms(x), 1 when (1 + weight) ⊙ x/rms(x) (Gemma), None otherwise.

    Measured on the module (once per class) rather than read from its class name; on a meta-device
    skeleton (no values) the Gemma naming convention is the fallback."""
    cls = type(norm)
    if cls in _GAIN_OFFSET:
        return _GAIN_OFFSET[cls]
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(norm, "bias", None) is not None:
        return None
    if weight.is_meta:
        return 1.0 if "Gemma" in cls.__name__ else 0.0
    dtype = weight.dtype
    x = _rms_probe_input(weight.shape[0], dtype, weight.device)
    with torch.no_grad():
        out = norm(x)
    unit = x.double() / x.double().pow(2).mean(-1, keepdim=True).sqrt()
    found = None
    for offset in (0.0, 1.0):
        if _close(out, unit * (offset + weight.detach().double()), dtype):
            found = offset
            break
    if found is not None:
        _GAIN_OFFSET[cls] = found
    return found


def effective_gain(norm: nn.Module) -> torch.Tensor:
    """The element-wise gain an RMSNorm applies: `weight`, or `1 + weight` for Gemma-style norms."""
    offset = rms_gain_offset(norm)
    if offset is None:
        raise UnsupportedModelError(f"{type(norm).__name__} is not an RMSNorm with gain weight or 1 + weight")
    return norm.weight + 1.0 if offset else norm.weight


# --- layers ------------------------------------------------------------------------------------------

def _refusal_reason(layer: nn.Module, names: set[str]) -> str:
    """Why a layer matches no block form, in the words of the support table."""
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    mlp_names = {n for n, _ in mlp.named_children()} if isinstance(mlp, nn.Module) else set()
    if any("cross_attn" in n for n in names):
        return ("it is a cross-attention layer (as in Mllama): its attention reads the image states, not the "
                "residual stream, and has no skipped form")
    if mlp_names & {"experts", "router", "gate", "shared_expert", "shared_experts"} and "gate_proj" not in mlp_names:
        return "its FFN is a mixture of experts: a PIA can only fold into one dense gated FFN"
    if not names & {"self_attn", "attention", "attn", "self_attention"}:
        return "it has no self-attention sub-layer (a recurrent, convolutional or linear-attention block)"
    if {"w1", "w2", "w3"} <= mlp_names:
        return "its FFN names its projections w1/w2/w3; the fold is implemented for gate_proj/up_proj/down_proj"
    gated = mlp_names >= {"gate_proj", "up_proj", "down_proj"} or mlp_names >= {"gate_up_proj", "down_proj"}
    if (mlp_names and not gated) or {"fc1", "fc2"} <= names:
        return "its FFN is not gated (gate/up/down): only a gated FFN can absorb a PIA"
    if "input_layernorm" not in names:
        return "it has no input_layernorm: post-LN blocks cannot be folded (the norm follows the attention)"
    if "mlp" not in names:
        return "it has no `mlp` feed-forward module"
    if "post_attention_layernorm" not in names:
        return "its FFN reads the attention's input norm (a parallel attention/FFN block): no second norm gain"
    extra = sorted(names - max(FORMS, key=lambda f: len(f.children & names)).children)
    if extra:
        return f"its sub-modules {extra} are not accounted for in any skipped form"
    return f"its sub-modules {sorted(names)} match no skipped form"


def block_form(index: int, layer: nn.Module) -> BlockForm:
    """The form of one stock decoder layer (structure only), or UnsupportedModelError naming why not."""
    names = {name for name, _ in layer.named_children()}
    prefix = f"decoder layer {index} ({type(layer).__name__})"
    form = next((f for f in FORMS if names == f.children), None)
    if form is None:
        raise UnsupportedModelError(f"{prefix}: {_refusal_reason(layer, names)}")
    mlp_names = _mlp_names(layer.mlp)
    kind = next((k for k in (_MLP_SPLIT, _MLP_FUSED) if mlp_names == k), None)
    if kind is None:
        closest = max((_MLP_SPLIT, _MLP_FUSED), key=lambda k: len(k & mlp_names))
        if not mlp_names >= closest - {"act_fn", "activation_fn"}:
            raise UnsupportedModelError(f"{prefix}: {_refusal_reason(layer, names)}")
        raise UnsupportedModelError(f"{prefix}: mlp sub-modules {sorted(mlp_names - closest)} are not "
                                    "accounted for in the gated FFN")
    for name in sorted(kind - {"act_fn", "activation_fn"}):
        if type(getattr(layer.mlp, name)) is not nn.Linear:
            raise UnsupportedModelError(f"{prefix}: mlp.{name} is not a plain Linear")
    for name in ("q_proj", "k_proj", "v_proj"):
        if type(getattr(layer.self_attn, name, None)) is not nn.Linear:
            raise UnsupportedModelError(f"{prefix}: self_attn has no plain Linear {name} for the kept-layer fold")
    for name in form.children - {"self_attn", "mlp"}:
        norm = getattr(layer, name)
        if getattr(norm, "eas_wrapped", False):  # a converted kept layer's input norm: check the norm inside
            norm = norm.norm
        if rms_gain_offset(norm) is None:
            raise UnsupportedModelError(f"{prefix}: {name} ({type(getattr(layer, name)).__name__}) is not an "
                                        "RMSNorm with gain weight or 1 + weight")
    return form


def probe_layer(index: int, layer: nn.Module, form: BlockForm) -> None:
    """Run the stock layer once with its attention output replaced by zeros and check that it computes the
    form's skipped block: y = x + [ffn_out_norm](FFN(ffn_norm(x))), with the attention reading
    input_layernorm(x), and that the FFN is W_d(act(W_g v) ⊙ W_u v). Nothing is left modified."""
    prefix = f"decoder layer {index} ({type(layer).__name__})"
    weight = layer.mlp.down_proj.weight
    dtype, device = weight.dtype, weight.device
    x = _rms_probe_input(weight.shape[0], dtype, device)[None] / 8.0
    seen: list[torch.Tensor] = []

    def zero_attention(*args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        seen.append(hidden)
        return torch.zeros_like(hidden), None

    attn = layer.self_attn
    with torch.no_grad():
        mlp = layer.mlp
        if not _close(mlp(x), gated_ffn(mlp, x), dtype):
            raise UnsupportedModelError(f"{prefix}: its mlp does not compute down(act(gate(v)) * up(v))")
        # An instance attribute, restored below (accelerate's hooks may hold one already): the module's own
        # code and tensors are untouched.
        previous = attn.__dict__.get("forward")
        attn.forward = zero_attention
        try:
            out = layer(x, attention_mask=None, position_ids=None, position_embeddings=None)
        except Exception as exc:  # a block whose forward needs more than the generic arguments
            raise UnsupportedModelError(f"{prefix}: the skipped-form probe could not run it ({exc})") from exc
        finally:
            if previous is None:
                del attn.forward
            else:
                attn.forward = previous
        out = out[0] if isinstance(out, tuple) else out
        expected = getattr(layer, form.ffn_norm)(x)
        expected = mlp(expected)
        if form.ffn_out_norm:
            expected = getattr(layer, form.ffn_out_norm)(expected)
        expected = x + expected
    if len(seen) != 1 or not _close(seen[0], layer.input_layernorm(x), dtype):
        raise UnsupportedModelError(f"{prefix}: its attention does not read input_layernorm(x) (not a pre-norm block)")
    if not _close(out, expected, dtype):
        raise UnsupportedModelError(f"{prefix}: with its attention zeroed it does not compute the {form.name} "
                                    "skipped block; some sub-module is not accounted for")


def layer_form(index: int, layer: nn.Module, *, probe: bool = False) -> BlockForm:
    """The form of a stock or converted layer; `probe` also runs the numerical check on a stock layer."""
    converted = getattr(layer, "eas_form", None)
    if converted is not None:
        return converted
    inner = getattr(layer, "kept", None)  # the search's switchable layer (eas.conversion.supernet) wraps one
    if isinstance(inner, nn.Module) and getattr(getattr(layer, "skipped", None), "eas_form", None) is not None:
        return layer_form(index, inner)
    form = block_form(index, layer)
    if probe and not _on_meta(layer):
        probe_layer(index, layer, form)
    return form


def check_layer(index: int, layer: nn.Module, *, converted_ok: bool = False) -> None:
    """Refuse a layer EAS cannot skip exactly (kept for callers that check one layer)."""
    if converted_ok and getattr(layer, "eas_skipped", False):
        return
    layer_form(index, layer, probe=True)


# --- the decoder -------------------------------------------------------------------------------------

def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and isinstance(getattr(module, "embed_tokens", None), nn.Module):
            found.append((name, module))
    return found


def locate_decoder(model: PreTrainedModel, *, probe: bool = False) -> Decoder:
    """The text decoder of `model`, or UnsupportedModelError naming why it cannot be converted.

    probe=True (what a conversion asks for) also runs the numerical check of every stock layer."""
    family = type(model).__name__
    candidates = _candidates(model)
    if not candidates:
        raise UnsupportedModelError(f"{family}: no text decoder found (no module owns both `embed_tokens` and "
                                    "a `layers` list of decoder blocks)")
    text_config = model.config.get_text_config(decoder=True)
    if len(candidates) > 1:
        own = [c for c in candidates if getattr(c[1], "config", None) is text_config]
        if len(own) != 1:
            names = ", ".join(n or "<root>" for n, _ in candidates)
            raise UnsupportedModelError(f"{family}: several text decoders ({names}); cannot tell which to convert")
        candidates = own
    path, module = candidates[0]
    layers = module.layers
    if len(layers) == 0:
        raise UnsupportedModelError(f"{family}: `{path}.layers` is empty")
    forms = tuple(layer_form(i, layer, probe=probe) for i, layer in enumerate(layers))
    return Decoder(family=family, path=path, module=module, layers=layers, text_config=text_config, forms=forms)
