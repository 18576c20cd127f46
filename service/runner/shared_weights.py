"""One copy of a model's weights in memory that two processes map: the server's HTTP process and its model
process (service/runner/process.py; docs/serving.md, "The model process").

Why: an idle server answers a lone request in the HTTP process itself, without the crossing to the model
process and back (a tenth of a one-client request on the 2-core machine), and sends batches to the model
process. Both need the weights; a second private copy would double the model's memory (a 7B model on a CPU
is 14-28 GB). So the parent moves its parameters into an anonymous memory file (`share`), hands the file to
the child, and the child, after its own load, checks each of its parameters against the shared one and
adopts it (`adopt`), freeing its private copy. Both processes then compute with the very same numbers, so an
answer does not depend on which of them ran it.

Only parameters are shared (buffers are small and some are rebuilt at run time), and only on the CPU.
Nothing writes them at inference, so the mapping is shared read-write without locks.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 64  # bytes: each tensor starts on a cache line


class WeightsDiffer(RuntimeError):
    """The child's loaded model has other parameters than the shared ones (names, shapes or dtypes)."""


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class SharedLayout:
    """Where each parameter lies in the shared file (sent to the child with the file)."""

    size: int
    slots: tuple[Slot, ...]


def share(module: nn.Module) -> tuple[int, SharedLayout] | None:
    """Move `module`'s parameters (CPU, each once even when tied) into a new anonymous memory file and
    return its descriptor and layout; None when there is nothing to share or a parameter is not on the CPU.
    The module keeps the mapping alive; the caller owns the descriptor."""
    params = list(module.named_parameters())
    if not params or any(p.device.type != "cpu" for _, p in params):
        return None
    slots, offset = [], 0
    for name, p in params:
        slots.append(Slot(name, str(p.dtype).removeprefix("torch."), tuple(p.shape), offset))
        offset += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
    fd = os.memfd_create("eas-weights")
    try:
        os.ftruncate(fd, offset)
        mapping = mmap.mmap(fd, offset)
        with torch.no_grad():
            for (_, p), slot in zip(params, slots, strict=True):
                view = _view(mapping, slot)
                view.copy_(p.detach())
                p.data = view
    except BaseException:
        os.close(fd)
        raise
    module._eas_shared_weights = mapping  # type: ignore[assignment]  # lives as long as the module
    return fd, SharedLayout(offset, tuple(slots))


def adopt(module: nn.Module, fd: int, layout: SharedLayout) -> list[str]:
    """Replace each of `module`'s parameters by its shared copy; WeightsDiffer, before anything is replaced,
    unless names, shapes and dtypes all agree. Returns the names whose values differed from the shared copy
    (a load that is not deterministic): adopted all the same, so that both processes answer alike."""
    mapping = mmap.mmap(fd, layout.size)
    params = dict(module.named_parameters())
    if set(params) != {slot.name for slot in layout.slots}:
        missing = sorted(set(params) ^ {slot.name for slot in layout.slots})
        raise WeightsDiffer(f"the parameters differ by name: {missing[:5]}")
    views, differing = [], []
    for slot in layout.slots:
        p = params[slot.name]
        if tuple(p.shape) != slot.shape or str(p.dtype).removeprefix("torch.") != slot.dtype:
            raise WeightsDiffer(f"parameter {slot.name}: {tuple(p.shape)} {p.dtype} here, {slot.shape} "
                                f"{slot.dtype} shared")
        view = _view(mapping, slot)
        if not torch.equal(p.detach(), view):
            differing.append(slot.name)
        views.append((p, view))
    for p, view in views:
        p.data = view
    module._eas_shared_weights = mapping  # type: ignore[assignment]
    return differing


def _view(mapping: mmap.mmap, slot: Slot) -> torch.Tensor:
    dtype = getattr(torch, slot.dtype)
    count = math.prod(slot.shape)
    if count == 0:
        return torch.empty(slot.shape, dtype=dtype)
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=slot.offset).view(slot.shape)
