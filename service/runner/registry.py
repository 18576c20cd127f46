"""Which runner serves which variant, swappable atomically while requests are in flight.

A request looks its variant up once and keeps the `ServedVariant` it got for its whole life, so a later
hot activation can load and warm a new version beside the old one, `install` it in one step, and then
drain and close the old one without failing any request that started on it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from service.batching.batcher import Batcher
from service.errors import NotFound
from service.runner.runner import ModelRunner, VariantInfo

VARIANTS: tuple[str, ...] = ("eas", "baseline")
# Names clients may use for "whatever this server serves by default".
DEFAULT_ALIASES = frozenset({"", "auto", "default"})


@dataclass(frozen=True, eq=False)
class ServedVariant:
    info: VariantInfo
    runner: ModelRunner
    batcher: Batcher

    @property
    def variant(self) -> str:
        return self.info.variant


class RunnerRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served: dict[str, ServedVariant] = {}
        self._default: str | None = None

    def install(self, served: ServedVariant, *, default: bool = False) -> ServedVariant | None:
        """Serve `served` under its variant name from now on; returns what it replaced (to be drained)."""
        with self._lock:
            previous = self._served.get(served.variant)
            self._served = {**self._served, served.variant: served}  # copy-on-write: readers never lock
            if default or self._default is None:
                self._default = served.variant
            return previous

    def remove(self, variant: str) -> ServedVariant | None:
        with self._lock:
            served = {**self._served}
            previous = served.pop(variant, None)
            self._served = served
            if self._default == variant:
                self._default = next(iter(served), None)
            return previous

    def set_default(self, variant: str) -> None:
        with self._lock:
            if variant not in self._served:
                raise NotFound(f"variant {variant!r} is not served", code="variant_not_found", param="variant")
            self._default = variant

    @property
    def default_variant(self) -> str | None:
        return self._default

    def all(self) -> list[ServedVariant]:
        return list(self._served.values())

    def get(self, variant: str | None) -> ServedVariant:
        """The runner for a variant name (`None`/`auto` → the default); 404 naming the choices otherwise."""
        served = self._served
        key = self._default if variant is None or variant.strip().lower() in DEFAULT_ALIASES else variant
        if key is not None and key in served:
            return served[key]
        choices = ", ".join(served) or "none loaded"
        raise NotFound(f"variant {variant!r} is not served (served variants: {choices})",
                       code="variant_not_found", param="variant")

    def resolve_model_id(self, model_id: str | None) -> ServedVariant:
        """OpenAI `model` field → variant. Accepts `eas`, `baseline`, the model name (default variant) and
        `<model>:<variant>`."""
        if model_id is None or model_id.strip().lower() in DEFAULT_ALIASES:
            return self.get(None)
        served = self._served
        if model_id in served:
            return served[model_id]
        name, _, variant = model_id.partition(":")
        matches = [c for c in served.values() if c.info.model == name and (not variant or c.variant == variant)]
        if matches:
            default = served.get(self._default or "")
            return default if default in matches else matches[0]
        ids = ", ".join(sorted({*served, *(f"{c.info.model}:{c.variant}" for c in served.values())}))
        raise NotFound(f"model {model_id!r} does not exist (served: {ids})", code="model_not_found",
                       param="model")
