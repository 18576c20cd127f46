"""In-process timings of one model: `LoadedModel.prepare → generate_ids → decode`, the calls the service's
runner makes, with the vision / prefill / decode split taken by the service's own phase hooks
(service/runner/phases.py), so raw and served phases mean the same thing.

- `vision_s`: vision tower + projector;
- `prefill_s`: to the first token's logits, minus vision (generate's set-up, embedding merge, the decoder
  over the whole prompt, the LM head);
- `decode_s`: every later token; `decode_per_token_s` divides it by the decode steps (new tokens − 1);
- `e2e_s`: the whole call, processor and detokenisation included (what `LoadedModel.answer` costs).

Each runner owns one long-lived thread and runs every call there, as the service runs each variant on its
batcher's worker thread. On the main thread the same generation was ~5% slower here (1.93 s vs 1.84 s,
BENCH geometry, 1 torch thread): glibc's main heap gives freed memory back to the OS after every call and
takes ~95 000 page faults to get it again (a worker thread's heap: ~5 000–24 000), which made "HTTP"
look faster than "in-process".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
from PIL import Image

from eas.model.loading import LoadedModel
from service.runner.phases import PhaseTimer

T = TypeVar("T")


@dataclass(frozen=True)
class RawTiming:
    e2e_s: float
    prepare_s: float
    vision_s: float
    prefill_s: float
    decode_s: float
    new_tokens: int
    prompt_tokens: int

    @property
    def decode_per_token_s(self) -> float:
        return self.decode_s / max(1, self.new_tokens - 1)

    def metrics(self) -> dict[str, float]:
        """The timed quantities by name (seconds), as reported."""
        return {"e2e_s": self.e2e_s, "prepare_s": self.prepare_s, "vision_s": self.vision_s,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_per_token_s": self.decode_per_token_s}

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "decode_per_token_s": self.decode_per_token_s}


class RawRunner:
    """Times generations of one loaded model on its own thread (with this thread's torch thread count)."""

    def __init__(self, loaded: LoadedModel, name: str = "raw") -> None:
        self.loaded = loaded
        self._timer = PhaseTimer(loaded.model, loaded.device)
        threads = torch.get_num_threads()  # OpenMP counts are per thread: hand ours to the worker
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bench-{name}",
                                        initializer=torch.set_num_threads, initargs=(threads,))

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on this runner's thread and wait for it."""
        return self._pool.submit(fn, *args).result()

    def run(self, images: list[Image.Image], questions: list[str], max_new_tokens: int) -> RawTiming:
        return self.call(self._run, images, questions, max_new_tokens)

    def _run(self, images: list[Image.Image], questions: list[str], max_new_tokens: int) -> RawTiming:
        t0 = time.perf_counter()
        batch = self.loaded.prepare(images, questions)
        t1 = time.perf_counter()
        with self._timer.measure() as marks:
            ids = self.loaded.generate_ids(batch, max_new_tokens)
        self.loaded.decode(ids)  # copies the ids to the host: on a GPU everything has finished here
        t2 = time.perf_counter()
        phases = marks.seconds()
        return RawTiming(e2e_s=t2 - t0, prepare_s=t1 - t0, vision_s=phases.get("vision_encoder", 0.0),
                         prefill_s=phases.get("prefill", 0.0), decode_s=phases.get("decode", 0.0),
                         new_tokens=int(ids.shape[1]), prompt_tokens=int(batch["input_ids"].shape[1]))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._timer.remove()
