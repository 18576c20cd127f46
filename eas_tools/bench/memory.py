"""Memory of a generation: KV-cache bytes (exact), weight bytes (exact) and peak memory.

Peak memory is the growth over the memory in use when the generation starts:
- CUDA: `torch.cuda.max_memory_allocated` after a reset (exact, allocator-level);
- CPU: the process's resident set sampled every millisecond by a thread (psutil). The CPU allocator keeps
  and reuses freed blocks, so a repeated run can show less growth than its tensors' true peak: read it as
  a lower bound. The exact numbers to compare variants on CPU are the KV cache and the weights.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
from PIL import Image

from eas.model.cache import kv_cache_bytes, make_cache
from eas.model.generation import generate
from eas.model.loading import LoadedModel

T = TypeVar("T")


@dataclass(frozen=True)
class MemoryResult:
    kv_cache_bytes: int  # after the whole generation (prompt + new tokens)
    peak_bytes: int | None  # growth during the generation; None when it cannot be measured
    peak_method: str
    weight_bytes: int

    def to_dict(self) -> dict[str, int | str | None]:
        return asdict(self)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(loaded: LoadedModel) -> int:
    model = loaded.model
    return tensor_bytes([*model.parameters(), *model.buffers()])


def peak_growth(fn: Callable[[], T], device: torch.device) -> tuple[T, int | None, str]:
    """Run `fn`; return its result, the peak memory growth in bytes and how that was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start, "cuda_max_memory_allocated"
    try:
        import psutil
    except ImportError:  # a dev extra: the run still reports the exact KV and weight bytes
        return fn(), None, "unavailable (install psutil)"
    process = psutil.Process()
    start = process.memory_info().rss
    peak = start
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        stop.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return result, peak - start, "cpu_rss_sampled_1ms"


def measure_generation_memory(loaded: LoadedModel, images: list[Image.Image], questions: list[str],
                              max_new_tokens: int) -> MemoryResult:
    """One untimed generation with an explicit cache (EAS layout: a DummyLayer per skipped layer)."""
    skipped = loaded.plan.skipped if loaded.plan is not None else ()
    batch = loaded.prepare(images, questions)
    cache = make_cache(loaded.model, skipped)

    def run() -> None:
        with torch.inference_mode():
            generate(loaded.model, batch, max_new_tokens=max_new_tokens, past_key_values=cache)

    _, peak, method = peak_growth(run, loaded.device)
    return MemoryResult(kv_cache_bytes=kv_cache_bytes(cache), peak_bytes=peak, peak_method=method,
                        weight_bytes=weight_bytes(loaded))
