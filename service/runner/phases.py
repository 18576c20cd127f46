"""Split one generation into model phases — vision encoder, prefill, decode — without touching the model
code (eas/model/** stays as it is): three forward hooks registered once per runner.

What each phase covers (a batch's phases; every request of the batch waited for all of it):

- `vision_encoder`: from the vision tower's forward starting to the projector's forward returning
  (vision tower + projector; Qwen2-VL's `visual` carries its merger inside). It runs inside the first
  forward pass of `generate`.
- `prefill`: from the start of `LoadedModel.generate_ids` to the end of the first forward pass of the whole
  model — i.e. time to the first token's logits — minus `vision_encoder`: generate's set-up (cache,
  masks), the embedding merge, the language model over the full prompt (image tokens included) and the
  LM head.
- `decode`: from the end of the first forward pass to `generate_ids` returning: every later single-token
  step plus generate's per-step bookkeeping (logits processing, stop checks).

`vision_encoder + prefill + decode` is the wall time of `generate_ids`; the runner's `inference_s` adds
detokenisation on top. Only the first call of each hook per generation counts, so later decode steps
(which call the top-level forward again) cost one dictionary lookup each.

On CUDA the marks are CUDA events on the model's stream, read after the runner has copied the ids to the
host (which waits for the GPU anyway), so timing adds no synchronisation; on CPU they are
`time.perf_counter()` readings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

# Attribute names of the vision encoder and of the projector that follows it, in the supported families
# (LLaVA: vision_tower + multi_modal_projector; Qwen2-VL: visual; Idefics3/SmolVLM: vision_model + connector).
VISION_ATTRS: tuple[str, ...] = ("vision_tower", "visual", "vision_model")
PROJECTOR_ATTRS: tuple[str, ...] = ("multi_modal_projector", "connector")


class Clock(Protocol):
    def mark(self) -> Any: ...

    def seconds(self, start: Any, end: Any) -> float: ...


class HostClock:
    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaClock:
    """CUDA events: they time the GPU's own timeline without forcing the host to wait for it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        end.synchronize()  # already complete once the ids reached the host; this is a cheap check then
        return start.elapsed_time(end) / 1000.0


def find_vision_modules(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(vision encoder, module whose forward ends the vision phase) or (None, None) for text-only models."""
    scopes = [m for m in (getattr(model, "model", None), model) if isinstance(m, nn.Module)]

    def first(names: tuple[str, ...]) -> nn.Module | None:
        for scope in scopes:
            for name in names:
                module = getattr(scope, name, None)
                if isinstance(module, nn.Module):
                    return module
        return None

    vision = first(VISION_ATTRS)
    if vision is None:
        return None, None
    return vision, first(PROJECTOR_ATTRS) or vision


class PhaseMarks:
    """The marks of one measured generation; `seconds()` turns them into phase durations."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.points: dict[str, Any] = {}

    def seconds(self) -> dict[str, float]:
        p, s = self.points, self.clock.seconds
        if "start" not in p or "end" not in p:
            return {}
        phases: dict[str, float] = {}
        vision = s(p["vision_start"], p["vision_end"]) if "vision_start" in p and "vision_end" in p else None
        if vision is not None:
            phases["vision_encoder"] = max(0.0, vision)
        if "first_forward_end" in p:
            to_first_token = s(p["start"], p["first_forward_end"])
            phases["prefill"] = max(0.0, to_first_token - (vision or 0.0))
            phases["decode"] = max(0.0, s(p["first_forward_end"], p["end"]))
        return phases


class PhaseTimer:
    """Forward hooks on one model; `measure()` brackets one generation on the calling thread."""

    def __init__(self, model: nn.Module, device: torch.device | str, clock: Clock | None = None) -> None:
        device = torch.device(device)
        self.clock: Clock = clock or (CudaClock(device) if device.type == "cuda" else HostClock())
        self._current: PhaseMarks | None = None
        self._owner: int | None = None  # hooks of other threads using the same model are ignored
        self._handles: list[Any] = []
        if not isinstance(model, nn.Module):  # a stand-in model (tests, wrappers): brackets only, no split
            return
        vision, vision_end = find_vision_modules(model)
        self._handles.append(model.register_forward_hook(self._on_forward_end))
        if vision is not None and vision_end is not None:
            self._handles += [vision.register_forward_pre_hook(self._on_vision_start),
                              vision_end.register_forward_hook(self._on_vision_end)]

    @contextmanager
    def measure(self) -> Iterator[PhaseMarks]:
        marks = PhaseMarks(self.clock)
        self._current, self._owner = marks, threading.get_ident()
        marks.points["start"] = self.clock.mark()
        try:
            yield marks
            marks.points["end"] = self.clock.mark()
        finally:
            self._current, self._owner = None, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _mark_once(self, name: str) -> None:
        marks = self._current
        if marks is not None and name not in marks.points and self._owner == threading.get_ident():
            marks.points[name] = self.clock.mark()

    def _on_vision_start(self, module: nn.Module, args: Any) -> None:
        self._mark_once("vision_start")

    def _on_vision_end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._mark_once("vision_end")

    def _on_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._mark_once("first_forward_end")
