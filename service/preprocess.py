"""The bounded preprocessing pool: image decode and the model's processor, per request, off the event loop
and off the batch worker (issue 17, H2 and M1; docs/hardening.md).

Every admitted request passes through here before it is queued: its image is opened, checked, decoded
towards the model's input size (service/validation/images.py `decode_for_model`) and run through the
processor alone (`LoadedModel.prepare_one`). What is queued is then small (the processor's tensors and a
reduced image) and its cost is known in tokens, so

- the prompt is refused (422, both numbers named) when it is longer than `Settings.max_prompt_tokens` or
  the model's positions, before it can take a batch's time;
- the batcher can keep one long prompt from padding many short ones (`WorkItem.tokens`);
- the batch worker only collates and runs the model.

Threads, not processes: Pillow's decoders and resizers and the Rust tokenizer release the GIL for their
heavy parts, the processor objects are not cheap to copy into other processes, and what comes back
(tensors) would have to be pickled. The pool has `Settings.preprocess_threads` threads; decoded pixels in
flight are bounded by `Settings.max_decode_bytes` (503 with Retry-After past it).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from eas.model.loading import LoadedModel
from service.errors import DeadlineExceeded, ServiceUnavailable, ValidationFailed
from service.validation.images import ImageLimits, ModelInputSize, decode_for_model, open_image


@dataclass(frozen=True)
class Prepared:
    """One request, ready to be batched."""

    image: Image.Image  # RGB, no larger than the model needs (the shadow mirror re-uses it)
    features: Any  # LoadedModel.prepare_one's BatchFeature, on the CPU
    tokens: int  # prompt length in tokens, image tokens included
    decode_s: float
    processor_s: float


class DecodeBudget:
    """Bytes of decoded pixels that requests being preprocessed hold at once (thread-safe)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def try_take(self, amount: int) -> bool:
        with self._lock:
            if self.used and self.used + amount > self.limit:  # one image alone is always allowed
                return False
            self.used += amount
            return True

    def give(self, amount: int) -> None:
        with self._lock:
            self.used -= amount


class Preprocessor:
    def __init__(self, threads: int, max_decode_bytes: int, retry_after_s: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="preprocess")
        self.budget = DecodeBudget(max_decode_bytes)
        self.retry_after_s = retry_after_s

    async def prepare(self, model: LoadedModel, data: bytes, question: str, *, limits: ImageLimits,
                      max_prompt_tokens: int, deadline: float) -> Prepared:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._prepare, model, data, question, limits,
                                          max_prompt_tokens, deadline)

    def _prepare(self, model: LoadedModel, data: bytes, question: str, limits: ImageLimits,
                 max_prompt_tokens: int, deadline: float) -> Prepared:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed before its image was decoded")
        t0 = time.perf_counter()
        header = open_image(data, limits)  # header only: the size tells what decoding will hold
        width, height = header.size
        cost = width * height * max(len(header.getbands()), 3)
        if not self.budget.try_take(cost):
            raise ServiceUnavailable("the server is decoding too many large images; retry later",
                                     code="overloaded", headers={"Retry-After": str(self.retry_after_s)})
        try:
            processor = getattr(model.processor, "image_processor", None)
            image = decode_for_model(data, limits, ModelInputSize.of(processor))
        finally:
            self.budget.give(cost)
        t1 = time.perf_counter()
        features = model.prepare_one(image, question)
        tokens = int(features["input_ids"].shape[1])
        limit = min(max_prompt_tokens, model.max_positions or max_prompt_tokens)
        if tokens > limit:
            raise ValidationFailed(f"the prompt is {tokens} tokens after processing (question and image); the "
                                   f"limit is {limit} tokens", code="prompt_too_long", param="question")
        return Prepared(image=image, features=features, tokens=tokens, decode_s=t1 - t0,
                        processor_s=time.perf_counter() - t1)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
