"""The decode loop of transformers' `generate` (greedy, dynamic cache), without its per-call set-up.

Why. On the embedded demo model a lone request's `model.generate` spends ~2 ms of 15-20 ms before and
around its two forward passes: deep-copying and validating the generation config, inspecting the
model's signature, building processors and criteria, checking the model kwargs. None of that depends on
the request. `Decoder` does it once per model (and again only when `model.generation_config` changes) and
then runs exactly the steps `generate` runs, calling the model's own hooks, so every family's overrides
(Qwen2-VL's rope positions, Gemma 3's token types, pre-encoded images) apply unchanged:

    special tokens → position ids from the mask → drop an all-ones mask → encode images
    (`_maybe_prepare_encoder_kwargs_for_generation`) → generated length → `logits_to_keep=1` → a
    `DynamicCache` (a `DummyLayer` in every skipped slot of a converted model) → processors and criteria
    (`_get_logits_processor`, `_get_stopping_criteria`, with the caller's own) → `_prefill` → per step:
    `_update_model_kwargs_for_generation`, processors, argmax, finished rows padded, criteria,
    `prepare_inputs_for_generation`, forward.

Same forward calls with the same inputs, so the same ids and logits (tests/core/test_decoding.py compares
both paths on every supported family, converted and not, with a negative control).

It applies only where that sequence is the whole of `generate`: greedy decoding (`do_sample=False`, one
beam, one sequence per row), a dynamic cache, no keyword beyond `logits_processor` and
`stopping_criteria`, no returned dict, scores or streamer, a decoder-only model given `input_ids` and an
`attention_mask`. Everything else — and any model whose generation config asks for more (another mode,
stop strings, a static cache on an unconverted model, chunked prefill) — goes to `model.generate`
(`for_call` says which). One call at a time per model, as with `generate`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any

import torch
from transformers import LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers.cache_utils import DynamicCache

from eas.model.cache import dummy_skipped_slots
from eas.model.pooling import generation_session

# Keywords the loop takes itself (sampling is a logits processor's: eas.model.generation._RowSampler).
LOOP_KEYWORDS = frozenset({"logits_processor", "stopping_criteria", "do_sample"})
_ATTRIBUTE = "_eas_decoder"


class Decoder:
    """One model's prepared generation: what `generate` would otherwise rebuild on every call."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        # A deep copy: a list in the config changed in place (suppress_tokens.append) must count as a change.
        self._source = copy.deepcopy(vars(model.generation_config))
        # What `generate` derives from the model's own generation config for a greedy call without options.
        self.config, unused = model._prepare_generation_config(None, do_sample=False)
        parameters = set(inspect.signature(model.forward).parameters)
        self.takes_position_ids = "position_ids" in parameters
        self.takes_attention_mask = "attention_mask" in parameters
        self.keep_last_logits = model._supports_logits_to_keep()
        self.default_max_length = model.generation_config.max_length is None
        self.default_min_length = model.generation_config.min_length is None
        self.skipped = tuple(runtime.plan.skipped) if (runtime := getattr(model, "_eas_runtime", None)) else ()
        self.cache_config = model.config.get_text_config(decoder=True)  # what generate builds its cache from
        self.reason = self._refusal(unused)

    def current(self) -> bool:
        """Still prepared from the model's generation config as it is now?"""
        return self._source == vars(self.model.generation_config)

    def _refusal(self, unused: dict[str, Any]) -> str | None:
        model, config = self.model, self.config
        converted = getattr(model, "_eas_pooling_state", None) is not None
        if model.config.is_encoder_decoder:
            return "an encoder-decoder model"
        if unused:
            return f"model kwargs from the generation config: {sorted(unused)}"
        if not self.takes_attention_mask:
            return "a forward without attention_mask"
        if not model._supports_default_dynamic_cache():
            return "a model without the default dynamic cache"
        mode = config.get_generation_mode()
        if str(getattr(mode, "value", mode)) != "greedy_search":
            return f"generation mode {getattr(mode, 'value', mode)}"
        if config.num_return_sequences not in (None, 1) or config.use_cache is False:
            return "several sequences per row, or no cache"
        # A converted model's own generate gives way to the dynamic cache (eas.model.stock_generate); an
        # unconverted one would build the cache its config names.
        if config.cache_implementation not in (None, "dynamic") and not converted:
            return f"cache_implementation {config.cache_implementation!r}"
        for name in ("prefill_chunk_size", "stop_strings", "token_healing", "return_dict_in_generate",
                     "output_scores", "output_logits", "output_attentions", "output_hidden_states"):
            if getattr(config, name, None):
                return f"generation config option {name}"
        return None

    @torch.no_grad()  # as transformers' generate: its ids stay writable outside inference mode
    def generate(self, batch: dict[str, Any], max_new_tokens: int, logits_processor: Any = None,
                 stopping_criteria: Any = None) -> torch.Tensor:
        """Ids with the prompt, `[B, N + T]`, as `model.generate(**batch, max_new_tokens=..., do_sample=False)`."""
        model = self.model
        config = copy.copy(self.config)  # per call: the special-token tensors and the length are set on it
        config.max_new_tokens = max_new_tokens
        kwargs = dict(batch)
        input_ids = kwargs.pop("input_ids")
        batch_size, prompt_length = input_ids.shape
        model._prepare_special_tokens(config, True, device=input_ids.device, batch_size=batch_size)
        if self.takes_position_ids and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = model._prepare_position_ids_for_generation(input_ids, kwargs)
        if (kwargs["attention_mask"] == 1).all():  # no padding: generate drops the mask, which is faster
            config._mask_length = kwargs["attention_mask"].shape[1]
            kwargs["attention_mask"] = None
        kwargs = model._maybe_prepare_encoder_kwargs_for_generation(input_ids, kwargs, "input_ids", config)
        config = model._prepare_generated_length(
            generation_config=config, has_default_max_length=self.default_max_length,
            has_default_min_length=self.default_min_length, model_input_name="input_ids",
            inputs_tensor=input_ids, input_ids_length=prompt_length)
        if self.keep_last_logits and "logits_to_keep" not in kwargs:
            kwargs["logits_to_keep"] = 1
        model._validate_generated_length(config, prompt_length, self.default_max_length)
        cache = DynamicCache(config=self.cache_config)
        kwargs["past_key_values"] = dummy_skipped_slots(cache, self.skipped) if self.skipped else cache
        processors = model._get_logits_processor(
            generation_config=config, input_ids_seq_length=prompt_length, encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(logits_processor or []),
            device=input_ids.device, model_kwargs=kwargs)
        criteria = model._get_stopping_criteria(
            generation_config=config, stopping_criteria=StoppingCriteriaList(stopping_criteria or []))
        kwargs["use_cache"] = True
        state = getattr(model, "_eas_pooling_state", None)
        session = generation_session(state) if state is not None else contextlib.nullcontext()
        with session, model._optimize_model_for_decode():
            return self._loop(input_ids, config, kwargs, processors, criteria)

    def _loop(self, input_ids: torch.Tensor, config: Any, kwargs: dict[str, Any], processors: Any,
              criteria: Any) -> torch.Tensor:
        """`_sample` in greedy mode, step for step."""
        model = self.model
        pad = config._pad_token_tensor
        pad = pad.to(input_ids.device) if pad is not None else None
        pads_finished = any(hasattr(c, "eos_token_id") for c in criteria)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        outputs = model._prefill(input_ids, config, kwargs, is_first_iteration=True)
        while True:
            kwargs = model._update_model_kwargs_for_generation(outputs, kwargs, is_encoder_decoder=False)
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
            tokens = torch.argmax(processors(input_ids, logits), dim=-1)
            if pads_finished:
                tokens = tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            unfinished = unfinished & ~criteria(input_ids, None)
            del outputs
            if unfinished.max() == 0:
                return input_ids
            inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **kwargs)
            outputs = model(**inputs, return_dict=True)


def decoder(model: PreTrainedModel) -> Decoder:
    """The model's `Decoder`, prepared on first use and again whenever its generation config changed."""
    prepared = model.__dict__.get(_ATTRIBUTE)
    if prepared is None or not prepared.current():
        prepared = Decoder(model)
        model.__dict__[_ATTRIBUTE] = prepared
    return prepared


def for_call(model: PreTrainedModel, batch: dict[str, Any], kwargs: dict[str, Any]) -> Decoder | None:
    """The model's `Decoder` when it runs this call exactly as `model.generate` would, else None."""
    if not set(kwargs) <= LOOP_KEYWORDS or kwargs.get("do_sample"):
        return None
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if any(key in batch for key in ("inputs_embeds", "past_key_values", "use_cache")):
        return None
    prepared = decoder(model)
    return prepared if prepared.reason is None else None


def applies(model: PreTrainedModel, batch: dict[str, Any], kwargs: dict[str, Any]) -> bool:
    """Would `Decoder.generate` run this call exactly as `model.generate` would?"""
    return for_call(model, batch, kwargs) is not None
