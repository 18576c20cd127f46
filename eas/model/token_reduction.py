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

from __future__ import annotations

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
        if scores is not None and total != images * tokens and total % (images * tokens) == 0:
            # Beam search / num_return_sequences: generate repeats each row (and its pre-encoded images)
            # `expand` times, row by row, after the scores were attached to the encoder output.
            expand = total // (images * tokens)
            scores = (scores[0].repeat_interleave(expand, dim=0), scores[1].repeat_interleave(expand, dim=0))
            images *= expand
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


def tokens_dropped(model: nn.Module) -> int:
    """Prompt positions the model's last prompt pass removed from every row (0 without a reduction): what a
    caller subtracts from the processor's prompt length to count the tokens the decoder really ran."""
    reducer = token_reducer(model)
    if reducer is None or reducer.last_prompt_tokens is None:
        return 0
    before, after = reducer.last_prompt_tokens
    return before - after


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
