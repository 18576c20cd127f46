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
(`assistant_model`, `prompt_lookup_num_tokens`), and a static/quantized cache (`cache_implementation`)
asked for by the caller; one that only the model's generation_config names gives way to the dynamic cache.

The methods are bound with `types.MethodType` and reach the model's state through `self`, so they
follow the instance (a `copy.deepcopy` of the model gets methods bound to the copy).
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from eas.model.cache import dummy_skipped_slots
from eas.model.pooling import PoolingState, generation_session

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
    """Refuse what the caller asked for and cannot be exact. A static cache that only the model's own
    generation_config names (Gemma 3 checkpoints ship `cache_implementation: "hybrid"`) is replaced by the
    dynamic cache for this call: same outputs, only the caller's explicit request is refused."""
    own = kwargs.get("generation_config") is None
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if own and "cache_implementation" not in kwargs and getattr(config, "cache_implementation", None) not in (
            None, "dynamic"):
        kwargs["cache_implementation"] = None
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
