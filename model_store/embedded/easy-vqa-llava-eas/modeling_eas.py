# ruff: noqa
"""EAS runtime for this converted model, bundled from the eas-serve package by eas.model.remote.

Load with `AutoModelForImageTextToText.from_pretrained(<this directory>, trust_remote_code=True)` (or
AutoModel / AutoModelForCausalLM / AutoConfig). The result is the stock transformers class of the base
model with the EAS conversion applied exactly, and its `generate` is exact (see the eas-serve
documentation, docs/eas-core.md, "Loading a converted directory").
"""

from __future__ import annotations


# ---- eas.model.adapters ----

"""The two EAS adapters (eas-method.md §3, §4), written in the reference's notation.

- `PIA` stands in for a removed attention: PIA(x̂_t) = x̂_t + s·Σ_i w_i (B_i z_t + b_Bi), with
  z_t = ½ (p + C x̂_t + b_C) and p = A m + b_A from the pooled prompt input m.
- `RoutedAdapter` sits between `input_layernorm` and `self_attn` of kept layers:
  Ad(x̂_t) = x̂_t + s·Σ_i w_i (B_i a_t + b_Bi), a_t = A x̂_t + b_A.

With `router=True` the weights w = softmax((E m + b_E)/τ) mix two up-projections (B and D), as in the
released code; with `router=False` (the project default) there is a single up-projection and w = (1),
which is what makes a static fold possible (eas-method.md §10 B).
"""



from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class AdapterConfig(BaseModel):
    """Hyper-parameters of every adapter in a converted model; persisted in its config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pia_rank: int = Field(32, gt=0)
    kept_rank: int = Field(8, gt=0)
    groups: int = Field(2, gt=0)
    scale: float = 1.0
    temperature: float = Field(10.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    router: bool = False
    kept_adapters: bool = True
    up_init: Literal["zero", "xavier"] = "zero"

    @model_validator(mode="after")
    def _divisible(self) -> AdapterConfig:
        for name in ("pia_rank", "kept_rank"):
            if getattr(self, name) % self.groups:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by groups={self.groups}")
        return self

    def check_hidden(self, hidden: int) -> None:
        if hidden % self.groups:
            raise ValueError(f"hidden size {hidden} is not divisible by groups={self.groups}")


class GroupedUp(nn.Module):
    """A block-diagonal r→d projection with G groups (a grouped 1×1 conv): output chunk g is
    B_g z_g + b[g], where z_g and the output are split into G contiguous chunks."""

    def __init__(self, rank: int, hidden: int, groups: int, init: str = "zero") -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(groups, hidden // groups, rank // groups))
        self.bias = nn.Parameter(torch.zeros(hidden))
        if init == "xavier":
            for block in self.weight.data:
                nn.init.xavier_uniform_(block)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        chunks = z.unflatten(-1, (self.groups, -1))
        out = torch.einsum("...gi,goi->...go", chunks, self.weight)
        return out.flatten(-2) + self.bias

    def dense(self) -> torch.Tensor:
        """The full d×r block-diagonal matrix, for folding."""
        return torch.block_diag(*self.weight)


def _xavier_linear(inp: int, out: int) -> nn.Linear:
    layer = nn.Linear(inp, out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _Mixture(nn.Module):
    """The routed pair of up-projections shared by both adapters: s·Σ_i w_i (B_i z + b_Bi)."""

    def __init__(self, rank: int, hidden: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.scale = cfg.scale
        self.temperature = cfg.temperature
        self.B = GroupedUp(rank, hidden, cfg.groups, cfg.up_init)
        if cfg.router:
            self.D = GroupedUp(rank, hidden, cfg.groups, cfg.up_init)
            self.E = nn.Linear(hidden, 2)
        else:
            self.D = None
            self.E = None

    @property
    def routed(self) -> bool:
        return self.E is not None

    def route(self, m: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights w [B, 2] from the pooled input m [B, d]; None without a router."""
        if self.E is None:
            return None
        return torch.softmax(self.E(m) / self.temperature, dim=-1)

    def up(self, z: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            return self.scale * self.B(z)
        w1 = w[:, 0, None, None]
        w2 = w[:, 1, None, None]
        return self.scale * (w1 * self.B(z) + w2 * self.D(z))


class PIA(nn.Module):
    """Parallel attention adapter for a skipped layer (§3). Stats (p, w) are computed once per
    sample from the pooled prompt input m by `prefill`, then reused for every token."""

    def __init__(self, hidden: int, cfg: AdapterConfig) -> None:
        super().__init__()
        cfg.check_hidden(hidden)
        r = cfg.pia_rank
        self.A = _xavier_linear(hidden, r)
        self.C = _xavier_linear(hidden, r)
        self.mix = _Mixture(r, hidden, cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def prefill(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(p [B, r], w [B, 2] or None) from the pooled normalised prompt input m [B, d]."""
        return self.A(m), self.mix.route(m)

    def forward(self, x_hat: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        p, w = stats
        z = 0.5 * (p[:, None, :] + self.C(x_hat))
        return x_hat + self.mix.up(self.dropout(z), w)


class RoutedAdapter(nn.Module):
    """The kept-layer adapter (§4): acts on x̂ before Q/K/V; the residual keeps the raw x."""

    def __init__(self, hidden: int, cfg: AdapterConfig) -> None:
        super().__init__()
        cfg.check_hidden(hidden)
        self.A = _xavier_linear(hidden, cfg.kept_rank)
        self.mix = _Mixture(cfg.kept_rank, hidden, cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def routed(self) -> bool:
        return self.mix.routed

    def prefill(self, m: torch.Tensor) -> torch.Tensor | None:
        return self.mix.route(m)

    def forward(self, x_hat: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return x_hat + self.mix.up(self.dropout(self.A(x_hat)), w)


# ---- eas.model.arch ----

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

A layer is accepted only if every one of its sub-modules is accounted for by its form, the FFN is
gated (gate/up/down + activation) and, on a model with real weights, a numerical probe agrees: with
the attention's output replaced by zeros, the stock layer computes exactly what the form says, the
attention reads input_layernorm's output, and each norm is an RMSNorm with gain `weight` or
`1 + weight`. Anything else is refused with a reason, before anything is modified.
"""



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
FORMS = (PRE_NORM, SANDWICH)
_MLP_CHILDREN = frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"})


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
    if "gate_up_proj" in mlp_names:
        return "its FFN fuses gate and up into one gate_up_proj; the fold is implemented for separate gate/up"
    if not names & {"self_attn", "attention", "attn", "self_attention"}:
        return "it has no self-attention sub-layer (a recurrent, convolutional or linear-attention block)"
    if (mlp_names and not mlp_names >= {"gate_proj", "up_proj", "down_proj"}) or {"fc1", "fc2"} <= names:
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
    mlp_names = {n for n, _ in layer.mlp.named_children()} | ({"act_fn"} if hasattr(layer.mlp, "act_fn") else set())
    if mlp_names != _MLP_CHILDREN:
        if not mlp_names >= {"gate_proj", "up_proj", "down_proj"}:
            raise UnsupportedModelError(f"{prefix}: {_refusal_reason(layer, names)}")
        raise UnsupportedModelError(f"{prefix}: mlp sub-modules {sorted(mlp_names - _MLP_CHILDREN)} are not "
                                    "accounted for in the gated FFN")
    for name in ("gate_proj", "up_proj", "down_proj"):
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
    x = _rms_probe_input(layer.mlp.gate_proj.in_features, dtype, device)[None] / 8.0
    seen: list[torch.Tensor] = []

    def zero_attention(*args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        seen.append(hidden)
        return torch.zeros_like(hidden), None

    attn = layer.self_attn
    with torch.no_grad():
        mlp = layer.mlp
        v = x[0]
        if not _close(mlp(v), mlp.down_proj(mlp.act_fn(mlp.gate_proj(v)) * mlp.up_proj(v)), dtype):
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


# ---- eas.model.pooling ----

"""Per-sample prompt statistics for skipped and routed layers (eas-method.md §5).

Each EAS layer needs the mean m of its normalised input over the *prompt* positions of each sample
(padding, answer tokens and generated tokens excluded). m — and whatever a layer derives from it
(p and w, or a folded per-sample bias) — is computed on a pass that covers the whole prompt and is
then frozen for that sample, so decode steps reuse it.

A `PoolingState` is shared by all EAS layers of one model. The prompt mask comes from, in order:
1. an explicit `prompt_context` (tests and research code that drive the forward passes themselves);
2. a *generation session* (`generation_session`, opened by the `generate` that eas.model.stock_generate
   installs on every converted model): the first top-level forward of the call is the prefill, its
   attention mask is the prompt mask, and it stays frozen for every later forward of that call — decode
   steps, and the full recomputations of `use_cache=False`, which must not pool the generated tokens;
3. otherwise a forward pre-hook that reads `attention_mask` and `labels` of each top-level call.

Every top-level call also says whether it continues a cache (a decode step: its input is shorter than
its attention mask, or the cache it gets already holds tokens); a continuation always reuses the frozen
statistics.
"""



from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class PoolingState:
    def __init__(self) -> None:
        self.prompt_mask: torch.Tensor | None = None  # [B, N] bool over the prompt positions
        self.explicit = False
        self.session = False  # inside a generate call: the mask is the first forward's, frozen after it
        self.captured = False  # the session's prefill has set the prompt mask
        self.continuation = False  # the current top-level call continues a cache (a decode step)
        self._frozen: dict[str, Any] = {}

    def reset(self, prompt_mask: torch.Tensor | None, explicit: bool = False) -> None:
        self.prompt_mask = None if prompt_mask is None else prompt_mask.to(torch.bool)
        self.explicit = explicit
        self.continuation = False
        self._frozen.clear()

    def per_sample(self, key: str, x_hat: torch.Tensor, derive: Callable[[torch.Tensor], Any]) -> Any:
        """derive(m) for the current batch; computed on a pass covering the whole prompt, frozen after.

        A pass is a prompt pass when it starts at position 0 and holds at least as many positions as the
        prompt mask (prefill, a training step, or a cache-free recomputation); only the first N positions,
        masked, are pooled. A continuation of a cache, or a shorter pass, is a decode step and gets the
        frozen value.
        """
        mask = self.prompt_mask
        length = x_hat.shape[1]
        if mask is None:
            mask = torch.ones(x_hat.shape[:2], dtype=torch.bool, device=x_hat.device)
        if not self.continuation and length >= mask.shape[1]:
            n = mask.shape[1]
            weights = mask.to(torch.float32)
            counts = weights.sum(dim=1, keepdim=True)
            if bool((counts == 0).any()):
                raise ValueError("a sample has no prompt positions to pool over")
            weights = (weights / counts).to(x_hat.dtype)
            m = torch.einsum("bn,bnd->bd", weights, x_hat[:, :n])
            value = derive(m)
            self._frozen[key] = value
            return value
        if key not in self._frozen:
            raise RuntimeError(f"{key}: decode step before the prompt was prefilled")
        return self._frozen[key]


def prompt_mask_from(attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                     length: int, device: torch.device) -> torch.Tensor:
    """Prompt positions of a batch: non-padding, and (in training) before the first supervised
    token of each sample (label != -100)."""
    if attention_mask is None:
        batch = labels.shape[0] if labels is not None else 1
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.to(torch.bool)
    if labels is not None:
        supervised = labels != -100
        positions = torch.arange(labels.shape[1], device=labels.device)
        first = torch.where(supervised, positions, labels.shape[1]).min(dim=1, keepdim=True).values
        mask = mask & (positions[None, :] < first)
    return mask


def install_hook(model: nn.Module, state: PoolingState) -> torch.utils.hooks.RemovableHandle:
    """Set the prompt mask from each top-level call unless an explicit context is active."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return
        attention_mask = kwargs.get("attention_mask")
        continuation = _continues_cache(ref, attention_mask, kwargs.get("past_key_values"))
        if state.explicit:
            state.continuation = continuation
            return
        if state.session:
            if not state.captured:
                if continuation:
                    raise RuntimeError("an EAS model cannot continue a cache filled outside this generate call: "
                                       "its prompt statistics come from the prefill")
                state.reset(prompt_mask_from(attention_mask, None, ref.shape[1], ref.device))
                state.captured = True
            state.continuation = continuation
            return
        if continuation:
            state.continuation = True  # a decode step: keep the frozen prompt statistics
            return
        mask = prompt_mask_from(attention_mask, kwargs.get("labels"), ref.shape[1], ref.device)
        state.reset(mask)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    # Lazy: both import this module. An exact `generate`, and a `save_pretrained` that writes the
    # directory format plain transformers cannot misread (eas.model.artefact).
    pass
    pass

    install_generate(model, state)
    install_save(model)
    return handle


def _continues_cache(ref: torch.Tensor, attention_mask: torch.Tensor | None, cache: object) -> bool:
    """Whether a top-level call continues cached positions (a decode step) rather than starting at 0."""
    if attention_mask is not None and ref.shape[1] < attention_mask.shape[1]:
        return True
    get_seq_length = getattr(cache, "get_seq_length", None)
    if get_seq_length is None:
        return False
    try:
        return get_seq_length() > 0
    except ValueError:  # a cache of DummyLayers only (every attention skipped) has no length
        return False


@contextmanager
def generation_session(state: PoolingState) -> Iterator[None]:
    """One generate call: the first top-level forward sets the prompt mask, frozen until the call ends.
    Inside an explicit `prompt_context` the explicit mask keeps precedence."""
    if state.explicit:
        yield
        return
    if state.session:
        raise RuntimeError("generate is already running on this EAS model (one call at a time per model)")
    state.reset(None)
    state.session, state.captured = True, False
    try:
        yield
    finally:
        state.session, state.captured = False, False
        state.reset(None)


@contextmanager
def prompt_context(state: PoolingState, prompt_mask: torch.Tensor) -> Iterator[None]:
    """Pool over `prompt_mask` ([B, N]) for every forward inside the block (generation, tests)."""
    state.reset(prompt_mask, explicit=True)
    try:
        yield
    finally:
        state.reset(None)


# ---- eas.model.layers ----

"""Decoder-layer replacements for EAS (eas-method.md §2, §8).

- `AdaptedNorm` wraps a kept layer's `input_layernorm`: Q/K/V see Ad(x̂); the residual keeps raw x.
- `SkippedLayer` is the adapter form of a skipped layer: y = x + FFN(g_f ⊙ PIA(x̂)); in a sandwich block
  (Gemma 2/3) g_f is pre_feedforward_layernorm's gain and post_feedforward_layernorm still follows the FFN.
- `MergedSkippedLayer` is its fold: y = x + W_d(act(W_g' x̂ + b_g) ⊙ (W_u' x̂ + b_u)), with the
  per-sample biases b_k = V_k p + κ_k computed once per sample at prefill (§10 B).

Skipped layers hold no `self_attn` (the weights are gone) and never touch the KV cache. They return a
tensor, like every transformers 5.x decoder layer, and keep the list index of the layer they replace.
"""



import torch
from torch import nn






class AdaptedNorm(nn.Module):
    """input_layernorm followed by the kept-layer adapter."""

    eas_wrapped = True  # eas.model.arch checks the norm inside

    def __init__(self, norm: nn.Module, adapter: RoutedAdapter, state: PoolingState, key: str) -> None:
        super().__init__()
        self.norm = norm
        self.adapter = adapter
        self._state = state
        self._key = key

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the norm's gain keeps working
        return self.norm.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x_hat = self.norm(hidden_states)
        w = self._state.per_sample(self._key, x_hat, self.adapter.prefill) if self.adapter.routed else None
        return self.adapter(x_hat, w)


class _SkippedBase(nn.Module):
    """What both forms of a skipped layer keep: input_layernorm, the FFN and, for a sandwich block, the norm
    on the FFN output (eas.model.arch.BlockForm). Sub-modules keep their stock names, so a saved model's keys
    are the stock keys minus the dropped ones."""

    eas_skipped = True

    def __init__(self, layer: nn.Module, state: PoolingState, layer_idx: int) -> None:
        super().__init__()
        form = layer_form(layer_idx, layer)
        self.eas_form = form
        self.input_layernorm = layer.input_layernorm
        self.mlp = layer.mlp
        if form.ffn_out_norm is not None:
            setattr(self, form.ffn_out_norm, getattr(layer, form.ffn_out_norm))
        self.layer_idx = layer_idx
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type
        self._state = state
        self._key = f"layer{layer_idx}"

    def _ffn_out(self, out: torch.Tensor) -> torch.Tensor:
        name = self.eas_form.ffn_out_norm
        return out if name is None else getattr(self, name)(out)


class SkippedLayer(_SkippedBase):
    """Adapter form: y = x + [ffn_out_norm](FFN(g_f ⊙ PIA(x̂))). The FFN's input norm (post_attention_layernorm
    in a pre-norm block, pre_feedforward_layernorm in a sandwich block) is kept only for its gain g_f."""

    def __init__(self, layer: nn.Module, pia: PIA, state: PoolingState, layer_idx: int) -> None:
        super().__init__(layer, state, layer_idx)
        setattr(self, self.eas_form.ffn_norm, getattr(layer, self.eas_form.ffn_norm))
        self.pia = pia

    @property
    def ffn_norm(self) -> nn.Module:
        return getattr(self, self.eas_form.ffn_norm)

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        x_hat = self.input_layernorm(hidden_states)
        stats = self._state.per_sample(self._key, x_hat, self.pia.prefill)
        h = self.pia(x_hat, stats) * effective_gain(self.ffn_norm)
        return hidden_states + self._ffn_out(self.mlp(h))


class MergedSkippedLayer(_SkippedBase):
    """Folded form. gate/up hold W_k' = W_k diag(g_f) M; the per-sample bias needs A (for p) and
    V_k, κ_k; decode costs one RMSNorm, one FFN and two bias adds (plus the FFN-output norm of a
    sandwich block, which the stock layer computes too)."""

    def __init__(self, layer: nn.Module, state: PoolingState, layer_idx: int, rank: int) -> None:
        super().__init__(layer, state, layer_idx)
        hidden = self.mlp.gate_proj.in_features
        ffn = self.mlp.gate_proj.out_features
        dtype = self.mlp.gate_proj.weight.dtype
        self.pia_A = nn.Linear(hidden, rank, dtype=dtype)
        self.register_buffer("V_gate", torch.zeros(ffn, rank, dtype=dtype))
        self.register_buffer("V_up", torch.zeros(ffn, rank, dtype=dtype))
        self.register_buffer("kappa_gate", torch.zeros(ffn, dtype=dtype))
        self.register_buffer("kappa_up", torch.zeros(ffn, dtype=dtype))

    def sample_biases(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pia_A(m)
        return p @ self.V_gate.T + self.kappa_gate, p @ self.V_up.T + self.kappa_up

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        x_hat = self.input_layernorm(hidden_states)
        b_gate, b_up = self._state.per_sample(self._key, x_hat, self.sample_biases)
        mlp = self.mlp
        gate = mlp.gate_proj(x_hat) + b_gate[:, None, :]
        up = mlp.up_proj(x_hat) + b_up[:, None, :]
        return hidden_states + self._ffn_out(mlp.down_proj(mlp.act_fn(gate) * up))


# ---- eas.model.plan ----

"""The skip plan: which attention sub-layers a converted model drops, why, and for which source model."""



import hashlib
import json

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel


class PlanError(ValueError):
    """A plan does not fit the model it is applied to."""


class SkipPlan(BaseModel):
    """Skipped layer indices (0-based decoder layers), with the criterion and scores that chose them.

    `scores[i]` is layer i's redundancy score (higher = more redundant); `fingerprint` identifies the
    source model the plan was made for.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    skipped: tuple[int, ...]
    num_layers: int = Field(gt=0)
    criterion: str = "manual"
    scores: tuple[float, ...] | None = None
    fingerprint: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SkipPlan:
        bad = [i for i in self.skipped if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"skipped layer index {bad[0]} out of range 0..{self.num_layers - 1}")
        if len(set(self.skipped)) != len(self.skipped):
            dupes = sorted({i for i in self.skipped if self.skipped.count(i) > 1})
            raise ValueError(f"duplicate skipped layer indices: {dupes}")
        if len(self.skipped) >= self.num_layers:
            raise ValueError(
                f"all {self.num_layers} attention layers skipped; at least one must be kept "
                "(the KV cache needs one attention layer to track positions)"
            )
        if self.scores is not None and len(self.scores) != self.num_layers:
            raise ValueError(f"scores has {len(self.scores)} entries for {self.num_layers} layers")
        if tuple(sorted(self.skipped)) != self.skipped:
            object.__setattr__(self, "skipped", tuple(sorted(self.skipped)))
        return self

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.skipped)

    @property
    def skip_fraction(self) -> float:
        return len(self.skipped) / self.num_layers

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> SkipPlan:
        return cls.model_validate_json(text)

    def check_model(self, model: PreTrainedModel, num_layers: int, *, check_fingerprint: bool = True) -> None:
        """Raise PlanError when the plan was made for another model. `check_fingerprint=False` only checks
        the shape: a saved conversion's stock skeleton (folded weights) never matches its source's print."""
        if num_layers != self.num_layers:
            raise PlanError(f"plan is for {self.num_layers} decoder layers, the model has {num_layers}")
        if check_fingerprint and self.fingerprint is not None:
            actual = model_fingerprint(model)
            if actual != self.fingerprint:
                raise PlanError(
                    f"plan fingerprint {self.fingerprint[:12]}… does not match this model ({actual[:12]}…): "
                    "the plan was made for a different source model"
                )


def model_fingerprint(model: PreTrainedModel, samples_per_tensor: int = 64) -> str:
    """A cheap identity of a model: class, config, every tensor's name and shape and a strided
    sample of its values (hashing every weight of a 7B model would take tens of seconds)."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    text = config.get("text_config")
    if isinstance(text, dict):
        text.pop("eas", None)
        text.pop("dtype", None)
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            # Rounded to bf16 so the same weights loaded in fp32, fp16 or bf16 give one fingerprint.
            sample = flat[::step][:samples_per_tensor].to(device="cpu", dtype=torch.bfloat16).double()
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


# ---- eas.model.convert ----

"""Apply a skip plan to a model: drop attention, insert PIA / kept-layer adapters, freeze the base.

`apply_plan` validates everything before it touches the model, so a refused model is left unchanged.
The converted model keeps its class; the plan and adapter settings are recorded in the text config
(`text_config.eas`) so that a saved model can be rebuilt exactly on load.
"""



from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel







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


# ---- eas.model.artefact ----

"""The on-disk form of a converted model: plain transformers loads it exactly or refuses (issue 15, item 3).

A converted directory (format 2, written by `eas.model.persistence.save_converted` and by
`save_pretrained` on any converted model) differs from a stock one in three places:
- `config.json` names `model_type: "eas"` and `architectures: ["EASModel"]`; the stock model type and
  architecture are kept under `eas_base`, and `auto_map` points every Auto class at `modeling_eas.py`;
- the weights are saved under the `eas` variant (`model.eas.safetensors`, or
  `model.safetensors.index.eas.json` and its shards), so no stock class finds `model.safetensors`;
- `modeling_eas.py` is the EAS runtime, self-contained (eas.model.remote bundles it from this package:
  it imports torch, transformers and pydantic, never `eas`).

With `trust_remote_code=True`, `AutoConfig` / `AutoModel` / `AutoModelForImageTextToText` /
`AutoModelForCausalLM` run `EASConfig` and `EASModel` below: the stock config is rebuilt from
`eas_base`, the stock class loads the stock tensors, and `rebuild` re-applies the conversion and loads
the EAS tensors strictly — the exact converted model, with the exact `generate`
(eas.model.stock_generate). Without the flag, the Auto classes refuse (an unknown model type with
remote code), and every stock class's `from_pretrained` refuses (no `model.safetensors`).

The first format (stock `config.json` with `text_config.eas`, `model.safetensors`) is still read by
eas.model.persistence; only transformers alone misreads it.
"""



import json
import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel




MODEL_TYPE = "eas"
WEIGHTS_VARIANT = "eas"
BASE_KEY = "eas_base"
REMOTE_MODULE = "modeling_eas"
REMOTE_FILE = REMOTE_MODULE + ".py"
CONFIG_CLASS = "EASConfig"
MODEL_CLASS = "EASModel"
AUTO_CLASSES = ("AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM")
CONFIG_FILE = "config.json"


class ArtefactError(ValueError):
    """A converted directory is incomplete or does not match its own plan."""


# --- config.json ---------------------------------------------------------------------------------


def is_eas_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def to_disk_config(stock: dict[str, Any]) -> dict[str, Any]:
    """The format-2 config.json of a converted model from its stock config dict."""
    out = {k: v for k, v in stock.items() if k not in ("model_type", "architectures", "auto_map")}
    out[BASE_KEY] = {"model_type": stock["model_type"], "architectures": list(stock.get("architectures") or [])}
    out["model_type"] = MODEL_TYPE
    out["architectures"] = [MODEL_CLASS]
    out["auto_map"] = {"AutoConfig": f"{REMOTE_MODULE}.{CONFIG_CLASS}",
                       **{auto: f"{REMOTE_MODULE}.{MODEL_CLASS}" for auto in AUTO_CLASSES}}
    return out


def from_disk_config(config: dict[str, Any]) -> dict[str, Any]:
    """The stock config dict back from a format-2 config.json."""
    base = config.get(BASE_KEY)
    if not is_eas_config(config) or not isinstance(base, dict) or not base.get("architectures"):
        raise ArtefactError(f"not an EAS config.json (model_type {config.get('model_type')!r}, no {BASE_KEY})")
    out = {k: v for k, v in config.items() if k not in (BASE_KEY, "auto_map")}
    out["model_type"] = base["model_type"]
    out["architectures"] = list(base["architectures"])
    return out


def stock_config(config: dict[str, Any], **kwargs: Any) -> Any:
    """A stock config object from a stock config dict (kwargs as for `PretrainedConfig.from_dict`)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ArtefactError(f"the converted model's base type {model_type!r} is unknown to transformers "
                            f"{transformers.__version__}")
    return CONFIG_MAPPING[model_type].from_dict(dict(config), **kwargs)


def stored_conversion_dict(config: Any) -> dict[str, Any] | None:
    """The raw `text_config.eas` record of a stock config object, or None."""
    raw = getattr(config.get_text_config(decoder=True), "eas", None)
    return raw if isinstance(raw, dict) else None


def stock_class(config: Any) -> type[PreTrainedModel]:
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ArtefactError(f"the converted model's base architecture {arch!r} is unknown to transformers "
                            f"{transformers.__version__}")
    return cls


def rewrite_saved_config(directory: str | Path) -> None:
    """Turn the stock config.json that `save_pretrained` wrote into the format-2 one, in place."""
    path = Path(directory) / CONFIG_FILE
    config = json.loads(path.read_text())
    if not is_eas_config(config):
        path.write_text(json.dumps(to_disk_config(config), indent=2, sort_keys=True) + "\n")


# --- weights ---------------------------------------------------------------------------------------


def weight_files(directory: str | Path, variant: str | None) -> list[Path]:
    """The safetensors files of a saved model (variant as in `save_pretrained`)."""
    directory = Path(directory)
    single, index = "model.safetensors", "model.safetensors.index.json"
    if variant:
        single, index = f"model.{variant}.safetensors", f"model.safetensors.index.{variant}.json"
    if (directory / index).is_file():
        names = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return [directory / single]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own warnings off for a block: the stock loader prints a load report of the keys we
    expect to differ, and `rebuild` reports what it finds itself."""
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


def rebuild(model: PreTrainedModel, info: dict, files: list[Path], where: str) -> PreTrainedModel:
    """Re-apply the conversion recorded in `model.config` to a stock-loaded skeleton and load the EAS
    tensors strictly. The stock loader silently re-initialises what it does not find, so the keys it
    reports missing must be exactly the removed ones and the unexpected keys exactly the EAS tensors."""
    stored = stored_conversion(model.config)
    if stored is None:
        raise ArtefactError(f"{where}: not an EAS-converted model (no text_config.eas)")
    plan, adapters, merged = stored
    text = model.config.get_text_config(decoder=True)
    delattr(text, "eas")  # apply_plan records it again
    stock_keys = set(model.state_dict())
    # The plan's fingerprint names the *source* model; this skeleton holds the converted weights.
    apply_plan(model, plan, adapters, merged=merged, check_fingerprint=False)
    converted_keys = set(model.state_dict())
    expected_missing, expected_unexpected = stock_keys - converted_keys, converted_keys - stock_keys
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    if missing != expected_missing or unexpected != expected_unexpected or info.get("mismatched_keys"):
        problems = []
        if lost := sorted(missing - expected_missing):
            problems.append(f"tensors missing from the checkpoint: {lost[:5]}")
        if extra := sorted(unexpected - expected_unexpected):
            problems.append(f"unknown tensors in the checkpoint: {extra[:5]}")
        if absent := sorted(expected_unexpected - unexpected):
            problems.append(f"EAS tensors missing from the checkpoint: {absent[:5]}")
        if stale := sorted(expected_missing - missing):
            problems.append(f"tensors that the plan removes are present: {stale[:5]}")
        if info.get("mismatched_keys"):
            problems.append(f"tensors with the wrong shape: {list(info['mismatched_keys'])[:5]}")
        raise ArtefactError(f"{where}: checkpoint does not match its EAS plan; " + "; ".join(problems))
    _load_eas_tensors(model, files, sorted(expected_unexpected), where)
    return model.eval()


def _load_eas_tensors(model: PreTrainedModel, files: list[Path], keys: list[str], where: str) -> None:
    """Copy the EAS tensors (named in memory) from the checkpoint (named in the on-disk layout)."""
    state = model.state_dict()
    decoder = locate_decoder(model)
    mem_prefix = decoder.path + ".layers."
    on_disk: dict[str, Path] = {}
    for file in files:
        with safe_open(file, "pt") as fh:
            on_disk.update(dict.fromkeys(fh.keys(), file))
    # The decoder's layers may sit under another prefix on disk (LLaVA's legacy layout): find it from
    # one layer key that both layouts share.
    probe = next(f"{i}.mlp.down_proj.weight" for i in range(len(decoder.layers)))
    matches = [k for k in on_disk if k.endswith(".layers." + probe) or k == "layers." + probe]
    if len(matches) != 1:
        raise ArtefactError(f"{where}: cannot locate the decoder layers in the checkpoint")
    disk_prefix = matches[0][: -len(probe)]
    with torch.no_grad():
        for key in keys:
            if not key.startswith(mem_prefix):
                raise ArtefactError(f"{where}: unexpected EAS tensor outside the decoder layers: {key}")
            disk_key = disk_prefix + key[len(mem_prefix):]
            if disk_key not in on_disk:
                raise ArtefactError(f"{where}: tensor {disk_key} is missing")
            with safe_open(on_disk[disk_key], "pt") as fh:
                tensor = fh.get_tensor(disk_key)
            target = state[key]
            if tensor.shape != target.shape:
                raise ArtefactError(f"{where}: tensor {disk_key} has shape {tuple(tensor.shape)}, "
                                    f"expected {tuple(target.shape)}")
            target.copy_(tensor.to(target.dtype))


# --- save_pretrained on a converted model -----------------------------------------------------------


def _eas_save_pretrained(self: PreTrainedModel, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """`save_pretrained` of a converted model: always format 2 (see the module docstring)."""
    if stored_conversion(self.config) is None:
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("variant") not in (None, WEIGHTS_VARIANT):
        raise ValueError(f"a converted model is saved under the {WEIGHTS_VARIANT!r} weights variant")
    kwargs["variant"] = WEIGHTS_VARIANT
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    rewrite_saved_config(save_directory)
    write_remote_code(save_directory)
    return result


def write_remote_code(directory: str | Path) -> None:
    pass

    (Path(directory) / REMOTE_FILE).write_text(remote_source())


def install_save(model: PreTrainedModel) -> None:
    model.save_pretrained = types.MethodType(_eas_save_pretrained, model)


# --- the classes auto_map names -----------------------------------------------------------------------


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")
_DROPPED_KWARGS = ("trust_remote_code", "code_revision", "adapter_kwargs", "_from_auto", "_commit_hash",
                   "return_unused_kwargs")


def _local_dir(path: str | os.PathLike, kwargs: dict[str, Any]) -> Path:
    if kwargs.get("subfolder"):
        raise ValueError("a converted EAS model cannot be loaded from a subfolder")
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    hub = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "revision", "token") if k in kwargs}
    return Path(snapshot_download(repo_id=str(path), **hub))


class EASConfig(PretrainedConfig):
    """What `AutoConfig` runs for a format-2 directory: it returns the *stock* config (with the plan under
    `text_config.eas` and this `auto_map`), so that the stock class builds the skeleton."""

    model_type = MODEL_TYPE

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        for name in _DROPPED_KWARGS[:-1]:
            kwargs.pop(name, None)
        config_dict, kwargs = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **kwargs)
        stock = from_disk_config(config_dict)
        stock["auto_map"] = config_dict.get("auto_map")
        return stock_config(stock, **kwargs)


class EASModel(PreTrainedModel):
    """What the Auto model classes run for a format-2 directory: the stock class's `from_pretrained`
    (weights variant "eas", fp32), then `rebuild`. Returns an instance of the stock class, converted.

    Supported keywords: `dtype`/`torch_dtype` (a torch dtype or its name; "auto" keeps fp32),
    `device_map` as one device ("cpu", "cuda:0"), `output_loading_info`, the hub keywords; anything
    else goes to the stock `from_pretrained`."""

    config_class = EASConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: Any = None, **kwargs: Any) -> Any:
        return load_pretrained(pretrained_model_name_or_path, config=config, **kwargs)


def load_pretrained(path: str | os.PathLike, config: Any = None, **kwargs: Any) -> Any:
    """Load a format-2 directory (local, or a hub repository id) into the exact converted model."""
    directory = _local_dir(path, kwargs)
    for name in (*_HUB_KWARGS, *_DROPPED_KWARGS, "subfolder"):
        kwargs.pop(name, None)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    device = kwargs.pop("device_map", None)
    want_info = kwargs.pop("output_loading_info", False)
    if device is not None and not isinstance(device, str | torch.device):
        raise ValueError("a converted EAS model loads onto one device: device_map must be a device name")
    if config is None or stored_conversion(config) is None:
        raw = json.loads((directory / CONFIG_FILE).read_text())
        config = stock_config(from_disk_config(raw) if is_eas_config(raw) else raw)
    cls = stock_class(config)
    reduction = (stored_conversion_dict(config) or {}).get("token_reduction")
    with quiet_transformers():
        model, info = cls.from_pretrained(directory, config=config, dtype=torch.float32, variant=WEIGHTS_VARIANT,
                                          output_loading_info=True, **kwargs)
    model = rebuild(model, info, weight_files(directory, WEIGHTS_VARIANT), str(path))
    if reduction is not None:  # a visual-token budget recorded beside the plan (eas.model.token_reduction)
        pass

        install_reduction(model, TokenReduction.model_validate(reduction))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    if want_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


# ---- eas.model.cache ----

"""KV-cache layout for skipped attention (transformers-notes.md §5).

A skipped layer never writes to the cache. With the default cache an unused slot at index 0 makes
`get_seq_length()` report 0, which breaks positions and masks of left-padded batches; so every
skipped slot is a `DummyLayer`, which the cache's bookkeeping skips. `make_cache` builds such a cache;
`dummy_skipped_slots` fixes one that transformers' `generate` built (eas.model.stock_generate).
"""



from collections.abc import Iterable

from transformers import PreTrainedModel
from transformers.cache_utils import DummyLayer, DynamicCache


def make_cache(model: PreTrainedModel, skipped: Iterable[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    return dummy_skipped_slots(cache, skipped)


def dummy_skipped_slots(cache: DynamicCache, skipped: Iterable[int]) -> DynamicCache:
    """Put a DummyLayer in every skipped slot of `cache`, in place. A slot that already holds keys is
    refused: the cache was filled by another model (or a conversion with another plan)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no per-layer slots; an EAS model needs a DynamicCache")
    for i in skipped:
        if i >= len(layers):
            raise ValueError(f"the cache has {len(layers)} layer slots; skipped layer {i} has none")
        layer = layers[i]
        if isinstance(layer, DummyLayer):
            continue
        if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            raise ValueError(f"cache slot {i} holds keys, but layer {i}'s attention is skipped")
        layers[i] = DummyLayer()
    return cache


def kv_cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by keys and values across all cache layers."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


# ---- eas.model.stock_generate ----

"""The stock `model.generate` made exact on a converted model (issue 15, item 2).

transformers' own `generate` knows nothing of EAS. Left alone it is wrong in two ways
(transformers-notes.md §5, eas-method.md §5):
- with `use_cache=False` every step is a full recomputation whose attention mask has grown by the
  generated tokens, so the per-sample prompt statistics would pool them too;
- the cache it builds has a `DynamicLayer` in every slot, and an unused slot 0 (layer 0 skipped)
  reports length 0, which corrupts positions and masks of a left-padded batch from the second step.

`install_generate` (called by `eas.model.pooling.install_hook`, hence by every conversion) puts two
bound methods on the converted *instance*, so plain `model.generate(**batch)` is exact:
- `generate` opens a pooling session (`eas.model.pooling.generation_session`): the first forward of
  the call is the prefill and its attention mask is the prompt mask, frozen until the call returns.
  Because the mask is taken from the prefill as `generate` ran it, beam search and
  `num_return_sequences` (whose inputs `generate` expands row by row) get per-beam statistics for free;
  every beam of a sample has the same prompt, so beam reordering never mixes statistics.
- `_prepare_cache_for_generation` runs the stock preparation and then puts a `DummyLayer` in every
  skipped slot of the cache it built (or of an empty cache the caller passed).

Refused, with a `ValueError` naming the option, because they would pool a partial prompt or verify
candidates against the wrong statistics: chunked prefill (`prefill_chunk_size`), assisted decoding
(`assistant_model`, `prompt_lookup_num_tokens`), and a static/quantized cache (`cache_implementation`).

The methods are bound with `types.MethodType` and reach the model's state through `self`, so they
follow the instance (a `copy.deepcopy` of the model gets methods bound to the copy).
"""



import types
from typing import Any

from torch import nn




_REFUSED = {
    "prefill_chunk_size": "chunked prefill would pool a part of the prompt",
    "assistant_model": "assisted decoding verifies candidates in multi-token passes the pooling cannot place",
    "prompt_lookup_num_tokens": "prompt-lookup decoding verifies candidates in multi-token passes",
    "cache_implementation": "only the dynamic cache gets DummyLayers in the skipped slots",
}


def _skipped_slots(model: nn.Module) -> tuple[int, ...]:
    runtime = getattr(model, "_eas_runtime", None)
    if runtime is not None:
        return tuple(runtime.plan.skipped)
    return ()


def _check_options(model: nn.Module, kwargs: dict[str, Any]) -> None:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    for name, why in _REFUSED.items():
        value = kwargs.get(name, getattr(config, name, None))
        if name == "cache_implementation" and value in (None, "dynamic"):
            continue
        if value is not None:
            raise ValueError(f"generate on an EAS-converted model does not support `{name}`: {why}")


def _eas_generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`generate` of a converted model: the stock method inside a pooling session."""
    state: PoolingState = self._eas_pooling_state
    _check_options(self, kwargs)
    with generation_session(state):
        return type(self).generate(self, *args, **kwargs)


def _eas_prepare_cache(self: nn.Module, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> Any:
    result = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    cache = model_kwargs.get("past_key_values")
    skipped = _skipped_slots(self)
    if cache is not None and skipped:
        dummy_skipped_slots(cache, skipped)
    return result


def install_generate(model: nn.Module, state: PoolingState) -> None:
    """Make `model.generate` exact for the EAS layers that share `state` (idempotent)."""
    model._eas_pooling_state = state
    model.generate = types.MethodType(_eas_generate, model)
    model._prepare_cache_for_generation = types.MethodType(_eas_prepare_cache, model)


def uninstall_generate(model: nn.Module) -> None:
    """The stock methods again (tests use it as the negative control)."""
    for name in ("generate", "_prepare_cache_for_generation"):
        model.__dict__.pop(name, None)


# ---- eas.model.token_reduction ----

"""Visual-token reduction between the projector and the decoder (docs/conversion.md, "Visual-token reduction").

A LLaVA prompt is mostly image tokens (64 of ~75 on the demo model, 576 of 588 on the bench geometry), and
every decoder layer, the KV cache and every decode step pay for each of them. `TokenReduction` keeps a
budget of them per image, chosen by a training-free criterion computed from the model's own vision tower:

- `cls`:     the attention the vision tower's CLS query pays to each patch, head-averaged, in the vision layer
             whose output feeds the projector (the [CLS]-attention ranking of FasterVLM, and FlowCut's use of
             CLS as the relay of information flow). A tower without a CLS token (SigLIP) ranks by the mean
             attention each patch *receives* from all queries instead.
- `merge`:   the `cls` ranking decides what is kept; every dropped token is then averaged into the kept token
             whose vision-tower key is most similar (cosine over the concatenated heads, as ToMe matches
             tokens), so its content is merged rather than lost (the prune-then-merge idea of Turbo).
- `uniform`: evenly spaced patches; a criterion-free control.

Mechanics. Hooks only, the model's classes and weights are untouched (`install_reduction`, removable):
a pre-hook on the multimodal model records which input positions are image tokens; a pre-hook on the
vision layer that feeds the projector scores its patches; a pre-hook on the text decoder drops the
unkept image rows from `inputs_embeds`, `attention_mask` and `position_ids`. Kept tokens keep their
*original* positions (explicit `position_ids`, so rotary sees the same angles as without reduction),
and the attention mask is always passed explicitly (with a gap in the positions and no mask, transformers
would take the rows for packed sequences). A post-hook scatters the decoder's output back to the full
length (dropped rows are zeros), so logits, labels and `logits_to_keep` outside keep their shapes; the
loss is unchanged because dropped rows are image tokens, which are never supervised nor precede a
supervised token. The KV cache holds only the kept rows; decode steps arrive in original coordinates
(generation's own bookkeeping) and are translated: the dropped columns leave the attention mask.
The EAS pooling statistics (eas/model/pooling.py) pool over the kept prompt positions.
"""



import json
import weakref
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import PreTrainedModel

CONFIG_FIELD = "token_reduction"  # inside text_config.eas, beside the plan (eas/model/convert.py)
CRITERIA = ("cls", "merge", "uniform")

# Families whose image tokens cannot be dropped safely here, and why.
REFUSED = {
    "Qwen2VLForConditionalGeneration": "mrope: the 3-D (time, row, column) positions are computed inside the "
                                       "model from the image grid; dropping rows would need them re-derived per "
                                       "token, which is not implemented",
    "Qwen2_5_VLForConditionalGeneration": "mrope: the 3-D (time, row, column) positions are computed inside the "
                                          "model from the image grid; dropping rows would need them re-derived "
                                          "per token, which is not implemented",
    "Idefics3ForConditionalGeneration": "its connector pixel-shuffles several patches into one image token and "
                                        "splits images into tiles with row/column marker tokens: the vision "
                                        "tower's attention does not map one-to-one onto image tokens",
    "SmolVLMForConditionalGeneration": "its connector pixel-shuffles several patches into one image token and "
                                       "splits images into tiles with row/column marker tokens: the vision "
                                       "tower's attention does not map one-to-one onto image tokens",
    "LlamaForCausalLM": "a text-only model has no image tokens",
    "Qwen2ForCausalLM": "a text-only model has no image tokens",
}


class TokenReductionError(ValueError):
    """Token reduction cannot be applied as asked; the message names the reason."""


class TokenReduction(BaseModel):
    """How many image tokens each image keeps (exactly one of a fraction or a count) and by which criterion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keep_fraction: float | None = Field(None, gt=0, le=1)
    keep_count: int | None = Field(None, gt=0)
    criterion: Literal["cls", "merge", "uniform"] = "cls"

    @model_validator(mode="after")
    def _one_budget(self) -> TokenReduction:
        if (self.keep_fraction is None) == (self.keep_count is None):
            raise ValueError("give exactly one token budget: keep_fraction or keep_count")
        return self

    def kept(self, tokens_per_image: int) -> int:
        """Image tokens kept out of `tokens_per_image` (at least 1, at most all; half rounds up)."""
        if self.keep_count is not None:
            return min(self.keep_count, tokens_per_image)
        return min(tokens_per_image, max(1, int(self.keep_fraction * tokens_per_image + 0.5)))

    def describe(self) -> str:
        budget = f"{self.keep_fraction:.1%}" if self.keep_fraction is not None else f"{self.keep_count}"
        return f"keep {budget} of image tokens by {self.criterion}"

    @property
    def is_identity(self) -> bool:
        return self.keep_fraction == 1.0


def parse_token_keep(value: str | float | int, criterion: str = "cls") -> TokenReduction:
    """'25%', '0.25' (a fraction) or '16' (a count) -> TokenReduction."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return TokenReduction(keep_fraction=float(text[:-1]) / 100, criterion=criterion)
        number = float(text)
    except ValueError as exc:
        raise TokenReductionError(f"token_keep {value!r}: give a fraction (0.25), a percentage (25%) "
                                  "or a count (16)") from exc
    if number <= 1:
        return TokenReduction(keep_fraction=number, criterion=criterion)
    if number != int(number):
        raise TokenReductionError(f"token_keep {value!r}: a count must be a whole number")
    return TokenReduction(keep_count=int(number), criterion=criterion)


# --- where things are in a supported model ------------------------------------------------------------------


def _vision_layers(model: PreTrainedModel) -> nn.ModuleList:
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TokenReductionError(f"{type(model).__name__}: the vision tower has no encoder.layers to score with")
    return layers


def _has_cls(model: PreTrainedModel) -> bool:
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    return hasattr(getattr(tower, "embeddings", None), "class_embedding")


def _scoring_layer(model: PreTrainedModel) -> int:
    """Index of the vision layer whose *output* feeds the projector: its attention is the one scored.
    hidden_states[0] is the embedding output, hidden_states[j] the output of layer j - 1."""
    n = len(_vision_layers(model))
    chosen = model.config.vision_feature_layer
    if isinstance(chosen, (list, tuple)):
        chosen = chosen[-1]  # several layers are concatenated: score the deepest
    index = chosen if chosen >= 0 else n + 1 + chosen
    if index <= 0:
        raise TokenReductionError("the projector reads the vision embeddings (vision_feature_layer selects no "
                                  "attention layer): there is no attention to score; use criterion 'uniform'")
    return index - 1


def check_reducible(model: PreTrainedModel, reduction: TokenReduction) -> None:
    """Raise TokenReductionError naming why `model`'s image tokens cannot be reduced this way."""
    family = type(model).__name__
    if family in REFUSED:
        raise TokenReductionError(f"{family}: visual-token reduction refused: {REFUSED[family]}")
    if family != "LlavaForConditionalGeneration":
        raise TokenReductionError(f"{family}: visual-token reduction is implemented for LLaVA only")
    if getattr(model.config, "image_token_id", None) is None:
        raise TokenReductionError(f"{family}: the config names no image token")
    _vision_layers(model)
    if reduction.criterion != "uniform":
        _scoring_layer(model)


# --- the criteria -------------------------------------------------------------------------------------------


@torch.no_grad()
def vision_scores(attn: nn.Module, hidden: torch.Tensor, *, cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance [n, T], keys [n, T, d]) of one vision attention layer on its input `hidden` [n, T, d].

    With a CLS token: softmax row of the CLS query (position 0), head-averaged. Without: the attention each
    token receives, averaged over queries and heads. Recomputes only Q and K (the values are not needed).
    """
    n, t, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    k = attn.k_proj(hidden).view(n, t, heads, head_dim).transpose(1, 2).float()
    q = attn.q_proj(hidden[:, :1] if cls else hidden).view(n, -1, heads, head_dim).transpose(1, 2).float()
    weights = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [n, heads, 1 or T, T]
    importance = weights.mean(dim=1)[:, 0] if cls else weights.mean(dim=(1, 2))
    keys = k.transpose(1, 2).reshape(n, t, heads * head_dim)
    return importance, keys


def select_tokens(reduction: TokenReduction, scores: torch.Tensor | None, tokens: int, images: int,
                  device: torch.device) -> torch.Tensor:
    """Kept image tokens, bool [images, tokens], exactly `reduction.kept(tokens)` per image."""
    k = reduction.kept(tokens)
    keep = torch.zeros(images, tokens, dtype=torch.bool, device=device)
    if reduction.criterion == "uniform":
        index = torch.linspace(0, tokens - 1, k, device=device).round().long()
        keep[:, index] = True
        return keep
    # Stable descending sort: ties broken by position, the same in a batch as alone.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    keep.scatter_(1, order, True)
    return keep


def merge_into_kept(features: torch.Tensor, keys: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Average each dropped token into its most key-similar kept token (equal weights). features [n, T, H],
    keys [n, T, d], keep [n, T] -> features with the kept rows replaced by their merged means."""
    unit = F.normalize(keys.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # [n, T, T]
    similarity = similarity.masked_fill(~keep[:, None, :], float("-inf"))
    target = similarity.argmax(dim=-1)  # every token's closest kept token (a kept token's is itself)
    sums = torch.zeros_like(features).scatter_add(1, target[..., None].expand_as(features), features)
    counts = torch.zeros(keep.shape, dtype=features.dtype, device=features.device)
    counts.scatter_add_(1, target, torch.ones_like(counts))
    merged = sums / counts.clamp_min(1)[..., None]
    return torch.where(keep[..., None], merged, features)


# --- the runtime --------------------------------------------------------------------------------------------


class TokenReducer:
    """The hooks of one model (see the module docstring). One call at a time per model, like generation."""

    def __init__(self, model: PreTrainedModel, reduction: TokenReduction) -> None:
        self.model = model
        self.reduction = reduction
        self.image_token_id = int(model.config.image_token_id)
        self.select_strategy = getattr(model.config, "vision_feature_select_strategy", "default")
        self.cls = _has_cls(model)
        self._image_mask: torch.Tensor | None = None
        self._scores: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scatter: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._session: tuple[Any, torch.Tensor] | None = None  # (weakref to the cache, dropped [B, N])
        self._reduced_prompt: torch.Tensor | None = None
        self._original_prompt: torch.Tensor | None = None
        self.last_prompt_tokens: tuple[int, int] | None = None  # (before, after) of the last prompt pass
        self.last_image_tokens = 0  # image tokens of the first prompt of that pass, before reduction
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        language_model = model.model.language_model
        self.handles.append(model.model.register_forward_pre_hook(self._record_images, with_kwargs=True))
        if reduction.criterion != "uniform":
            layer = _vision_layers(model)[_scoring_layer(model)]
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._score, with_kwargs=True))
            self.handles.append(model.model.vision_tower.register_forward_hook(self._attach_scores))
        self.handles.append(language_model.register_forward_pre_hook(self._reduce, with_kwargs=True))
        self.handles.append(language_model.register_forward_hook(self._restore, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # hooks
    def _record_images(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        # Only a pass that carries images is a prompt pass: a decode step may *generate* the image token's id.
        with_images = kwargs.get("pixel_values") is not None or encoded is not None
        self._image_mask = input_ids == self.image_token_id if input_ids is not None and with_images else None
        # Generation encodes the images once, before the first forward, and hands the encoder output to
        # every pass (each pass of a cache-free generation): the scores travel on that object. When the
        # forward encodes `pixel_values` itself, the vision tower's hook sets them during this call.
        self._scores = getattr(encoded, "eas_token_scores", None)

    def _score(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        importance, keys = vision_scores(module, hidden, cls=self.cls)
        if self.select_strategy == "default":  # LLaVA drops the CLS row before the projector
            importance, keys = importance[:, 1:], keys[:, 1:]
        self._pending = (importance, keys)

    def _attach_scores(self, _module: nn.Module, _args: tuple, output: Any) -> None:
        scores, self._pending = self._pending, None
        output.eas_token_scores = scores
        self._scores = scores

    def _pooling_state(self):
        runtime = getattr(self.model, "_eas_runtime", None)
        return None if runtime is None else runtime.state

    def _reduce(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        image_mask, self._image_mask = self._image_mask, None
        scores, self._scores = self._scores, None
        if embeds is None or args:
            return None
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        batch, length = embeds.shape[:2]
        if image_mask is not None and image_mask.shape == (batch, length) and bool(image_mask.any()):
            if past:
                raise TokenReductionError("image tokens after a cached prefix: token reduction needs the "
                                          "whole prompt in one pass")
            return args, self._prompt_pass(kwargs, embeds, image_mask, scores)
        session = self._session
        if past and session is not None and session[0]() is cache:
            return args, self._decode_pass(kwargs, batch, length, past, session[1])
        return None

    def _prompt_pass(self, kwargs: dict, embeds: torch.Tensor, image_mask: torch.Tensor,
                     scores: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
        batch, length, hidden = embeds.shape
        device = embeds.device
        if scores is None and self.reduction.criterion != "uniform":
            raise TokenReductionError("image tokens without vision-tower scores (pixel_values not passed?)")
        total = int(image_mask.sum())
        if scores is not None:
            images, tokens = scores[0].shape
        else:
            tokens = self._tokens_per_image()
            images = total // tokens
        if images * tokens != total:
            raise TokenReductionError(f"{total} image tokens do not split into images of {tokens} tokens")
        keep_image = select_tokens(self.reduction, None if scores is None else scores[0], tokens, images, device)
        if self.reduction.criterion == "merge":
            features = embeds[image_mask].view(images, tokens, hidden)
            merged = merge_into_kept(features, scores[1], keep_image)
            embeds = embeds.masked_scatter(image_mask[..., None], merged.to(embeds.dtype))
        keep = ~image_mask
        keep[image_mask] = keep_image.reshape(-1)  # row-major: image i's tokens in the order they were scattered
        counts = keep.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise TokenReductionError("samples of one batch would keep different numbers of tokens (different "
                                      "numbers of images per sample): run them separately")
        kept = int(counts[0])
        index = keep.nonzero()[:, 1].view(batch, kept)  # ascending positions per row
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None]
        if position_ids.ndim != 2:
            raise TokenReductionError("3-D (mrope) position ids cannot be reduced")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if attention_mask.ndim != 2:
            raise TokenReductionError("a 4-D attention mask cannot be reduced; pass the 2-D padding mask")
        kwargs["inputs_embeds"] = embeds.gather(1, index[..., None].expand(-1, -1, hidden))
        kwargs["position_ids"] = position_ids.expand(batch, -1).gather(1, index)
        kwargs["attention_mask"] = attention_mask.gather(1, index)
        self._reduce_prompt_mask(keep)
        self._scatter = (index, length, ~keep)
        self.last_prompt_tokens = (length, kept)
        self.last_image_tokens = int(image_mask[0].sum())
        return kwargs

    def _tokens_per_image(self) -> int:
        vision = self.model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        return tokens + (1 if self.select_strategy == "full" and self.cls else 0)

    def _reduce_prompt_mask(self, keep: torch.Tensor) -> None:
        """The pooled prompt positions follow the kept rows (the first N of a pass are the prompt)."""
        state = self._pooling_state()
        if state is None or state.prompt_mask is None:
            return
        original = self._original_prompt if state.prompt_mask is self._reduced_prompt else state.prompt_mask
        n = original.shape[1]
        rows = keep[:, :n]
        # A mask of one row (no attention mask given: every position is prompt) stands for the whole batch.
        reduced = original.expand(rows.shape[0], -1)[rows].view(rows.shape[0], -1)
        state.prompt_mask = reduced
        self._original_prompt, self._reduced_prompt = original, reduced

    def _decode_pass(self, kwargs: dict, batch: int, length: int, past: int, dropped: torch.Tensor) -> dict:
        n = dropped.shape[1]
        removed = int(dropped[0].sum())
        original_past = past + removed
        attention_mask = kwargs.get("attention_mask")
        device = kwargs["inputs_embeds"].device
        if attention_mask is None:
            attention_mask = torch.ones(batch, original_past + length, dtype=torch.long, device=device)
        if attention_mask.ndim != 2 or attention_mask.shape[1] != original_past + length:
            raise TokenReductionError("decode step: the attention mask does not cover the reduced prompt")
        head = attention_mask[:, :n][~dropped].view(batch, n - removed)
        kwargs["attention_mask"] = torch.cat([head, attention_mask[:, n:]], dim=1)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = (torch.arange(length, device=device) + original_past)[None]
        return kwargs

    def _restore(self, _module: nn.Module, _args: tuple, kwargs: dict, output: Any) -> Any:
        scatter, self._scatter = self._scatter, None
        if scatter is None:
            return None
        index, length, dropped = scatter
        hidden = output.last_hidden_state
        full = hidden.new_zeros(hidden.shape[0], length, hidden.shape[2])
        output.last_hidden_state = full.scatter(1, index[..., None].expand_as(hidden), hidden)
        cache = getattr(output, "past_key_values", None)
        self._session = None if cache is None else (weakref.ref(cache), dropped)
        return output


def token_reducer(model: nn.Module) -> TokenReducer | None:
    return getattr(model, "_eas_token_reducer", None)


def install_reduction(model: PreTrainedModel, reduction: TokenReduction, *, record: bool = True) -> TokenReducer:
    """Install `reduction`'s hooks on `model` (refused with the reason where unsafe) and, with `record`,
    write it into the EAS config of a converted model (`text_config.eas`), so a saved model keeps it."""
    check_reducible(model, reduction)
    if token_reducer(model) is not None:
        raise TokenReductionError("a token reduction is already installed on this model")
    reducer = TokenReducer(model, reduction)
    model._eas_token_reducer = reducer
    if record:
        stored = getattr(model.config.get_text_config(decoder=True), "eas", None)
        if isinstance(stored, dict):
            stored[CONFIG_FIELD] = reduction.model_dump(mode="json")
    return reducer


def reduction_info(model: nn.Module) -> dict[str, object] | None:
    """What /info shows: the budget and the last prompt's token counts (before, after), or None."""
    reducer = token_reducer(model)
    if reducer is None:
        return None
    info: dict[str, object] = reducer.reduction.model_dump(mode="json")
    if reducer.last_prompt_tokens is not None:
        info["last_prompt_tokens"] = list(reducer.last_prompt_tokens)
    return info


def remove_reduction(model: nn.Module) -> None:
    reducer = token_reducer(model)
    if reducer is not None:
        reducer.remove()
        del model._eas_token_reducer
        stored = getattr(model.config.get_text_config(decoder=True), "eas", None)
        if isinstance(stored, dict):
            stored.pop(CONFIG_FIELD, None)


def reduction_from_config(config: Any) -> TokenReduction | None:
    """The token reduction a model config records (`text_config.eas.token_reduction`), if any: a loader that
    rebuilds a conversion from its config reads it *before* apply_plan rewrites `text_config.eas`, then
    calls `install_reduction` on the rebuilt model."""
    raw = (getattr(config.get_text_config(decoder=True), "eas", None) or {}).get(CONFIG_FIELD)
    return None if raw is None else TokenReduction.model_validate(raw)


def stored_reduction(path: str | Path) -> TokenReduction | None:
    """The token reduction a saved model directory records (`text_config.eas.token_reduction`), if any."""
    config = json.loads((Path(path) / "config.json").read_text())
    text = config.get("text_config", config)
    raw = (text.get("eas") or {}).get(CONFIG_FIELD)
    return None if raw is None else TokenReduction.model_validate(raw)


def apply_stored_reduction(model: PreTrainedModel, path: str | Path) -> TokenReduction | None:
    """Re-install the reduction recorded in `path` on a model just loaded from it (load_model does this)."""
    reduction = stored_reduction(path)
    installed = token_reducer(model)
    if installed is not None and installed.reduction == reduction:
        return reduction  # the loader that rebuilt the conversion installed it already
    if reduction is not None:
        install_reduction(model, reduction)
    return reduction


# ---- bundle ----


def remote_source() -> str:
    """This bundle's own source: a converted model saved again ships the code it was loaded with."""
    return Path(__file__).read_text()
