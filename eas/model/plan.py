"""The skip plan: which attention sub-layers a converted model drops, why, and for which source model."""

from __future__ import annotations

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
