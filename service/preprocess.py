"""The bounded preprocessing pool: image decode and the model's processor, per request, off the event loop
and off the batch worker (issue 17, H2 and M1; docs/hardening.md). One bounded exception: on an idle server
a small image is prepared on the event loop itself, where nobody waits behind it (INLINE_BYTES).

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
flight are bounded by `Settings.max_decode_bytes` (503 with Retry-After past it). Images over
LARGE_PIXELS are decoded in a lane of their own, one at a time with at most LARGE_WAITING waiting (503 with
Retry-After past that), so ordinary requests never wait behind a flood of the largest allowed images.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from eas.model.loading import LoadedModel
from eas.model.prompting import find_marker
from service import allocator
from service.errors import DeadlineExceeded, QueueFull, ServiceError, ServiceUnavailable, ValidationFailed
from service.validation.images import ImageLimits, ModelInputSize, decode_for_model, open_image
from service.validation.payloads import OFFLOAD_BYTES


@dataclass(frozen=True)
class Prepared:
    """One request, ready to be batched."""

    image: Image.Image  # RGB, no larger than the model needs (the shadow mirror re-uses it)
    features: Any  # LoadedModel.prepare_one's BatchFeature, on the CPU (packed for a model process: `pack`)
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


# Images above this many pixels go through their own lane (one thread, a short waiting line), so a flood of
# the largest allowed images never queues ordinary requests behind them (issue 17, M1).
LARGE_PIXELS = 1024 * 1024
LARGE_WAITING = 4
LARGE_NICENESS = 19
# A request this small (encoded bytes, and pixels by its header) is prepared on the event loop itself when the
# server is idle: nothing else of its variant admitted, queued or running, nothing in the pool. Then it goes
# straight to the model, nobody waits behind it on the loop, and the pool's round trip (a thread's wake-up
# there, the loop's wake-up back) is pure latency: ~1.5 ms of wall time and ~0.7 ms of CPU per request at one
# client (docs/serving.md, "Peers"). With any other request in flight the pool keeps the loop free.
INLINE_BYTES = OFFLOAD_BYTES
INLINE_PIXELS = 512 * 512


class Preprocessor:
    def __init__(self, threads: int, max_decode_bytes: int, retry_after_s: int, *, refusal_status: int = 429,
                 large_pixels: int = LARGE_PIXELS, large_waiting: int = LARGE_WAITING,
                 inline_when_idle: bool = True, niceness: int = 0) -> None:
        self.refusal_status = refusal_status  # as for a full queue (Settings.queue_full_status)
        # `niceness` > 0: the pool's threads yield the cores to the model (docs/serving.md, "Threads and
        # neighbours"); a request's preparation then runs in the time the model leaves over.
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="preprocess",
                                        initializer=functools.partial(_lower_priority, niceness) if niceness else None)
        self._large = ThreadPoolExecutor(1, thread_name_prefix="preprocess-large", initializer=_lower_priority)
        self.large_pixels = large_pixels
        self.large_waiting = large_waiting
        self._large_count = 0  # large images waiting or decoding; only touched on the event loop
        self.inline_when_idle = inline_when_idle
        self._pooled = 0  # requests in the pool (either lane) right now; only touched on the event loop
        self.inlined = 0  # requests prepared on the event loop (a count for tests and benchmarks)
        self.budget = DecodeBudget(max_decode_bytes)
        self.retry_after_s = retry_after_s

    async def prepare(self, model: LoadedModel, data: bytes, question: str, *, limits: ImageLimits,
                      max_prompt_tokens: int, deadline: float, alone: bool = False,
                      pack: Callable[[Any], Any] | None = None) -> Prepared:
        """`alone`: the request's variant has nothing else admitted, queued or running. With nothing in the
        pool either, a small image is prepared right here on the event loop (INLINE_BYTES). `pack`: the
        runner's serialisation of the features (a model process's `ProcessRunner.pack`), done here, off the
        batch worker's path between two batches."""
        args = (model, data, question, limits, max_prompt_tokens, deadline, pack)
        if alone and self.inline_when_idle and self._pooled == 0 and len(data) <= INLINE_BYTES:
            header = open_image(data, limits)  # a small input's header: microseconds
            if header.size[0] * header.size[1] <= INLINE_PIXELS:
                self.inlined += 1
                return self._prepare(*args, header=header)
        self._pooled += 1
        try:
            return await self._prepare_in_pool(*args)
        finally:
            self._pooled -= 1

    async def _prepare_in_pool(self, *args: Any) -> Prepared:
        loop = asyncio.get_running_loop()
        # One trip to the pool for an ordinary image: the header (a PNG's chunk walk is bounded, not free)
        # picks the lane there, and a small image is prepared on the spot. A large one comes back (None)
        # and goes to its own lane.
        prepared = await loop.run_in_executor(self._pool, self._prepare_unless_large, *args)
        if prepared is not None:
            return prepared
        if self._large_count >= self.large_waiting:
            raise self._overloaded("large images")
        self._large_count += 1
        try:
            return await loop.run_in_executor(self._large, self._prepare_large, *args)
        finally:
            self._large_count -= 1

    def _prepare_unless_large(self, model: LoadedModel, data: bytes, question: str, limits: ImageLimits,
                              max_prompt_tokens: int, deadline: float,
                              pack: Callable[[Any], Any] | None = None) -> Prepared | None:
        header = open_image(data, limits)
        if header.size[0] * header.size[1] > self.large_pixels:
            return None
        return self._prepare(model, data, question, limits, max_prompt_tokens, deadline, pack, header=header)

    def _prepare_large(self, *args: Any) -> Prepared:
        try:
            return self._prepare(*args)
        finally:
            # A large decode leaves tens of MiB of freed heap in this thread's malloc arena; give it back once
            # the lane has nothing else waiting, so the process's memory returns to where it was after a
            # flood. Not after every image: malloc_trim walks and locks every arena, the event loop's too,
            # and during a flood of 4096² images that stalled the loop for tens of milliseconds at a time.
            if self._large_count <= 1:  # this one is the last (the loop decrements after it returns)
                allocator.trim()

    def _overloaded(self, what: str) -> ServiceError:
        """Refused like a full queue: 429 (or 503, Settings.queue_full_status) with Retry-After."""
        error = QueueFull if self.refusal_status == 429 else ServiceUnavailable
        return error(f"the server is decoding too many {what}; retry later", code="overloaded",
                     headers={"Retry-After": str(self.retry_after_s)})

    def _prepare(self, model: LoadedModel, data: bytes, question: str, limits: ImageLimits,
                 max_prompt_tokens: int, deadline: float, pack: Callable[[Any], Any] | None = None,
                 header: Image.Image | None = None) -> Prepared:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed before its image was decoded")
        check_plain_question(model, question)
        t0 = time.perf_counter()
        if header is None:
            header = open_image(data, limits)  # header only: the size tells what decoding will hold
        width, height = header.size
        cost = width * height * max(len(header.getbands()), 3)
        if not self.budget.try_take(cost):
            raise self._overloaded("large images")
        try:
            processor = getattr(model.processor, "image_processor", None)
            image = decode_for_model(data, limits, ModelInputSize.of(processor))
        finally:
            self.budget.give(cost)
        t1 = time.perf_counter()
        try:
            features = model.prepare_one(image, question)
        except ValueError as exc:  # the processor refused this image and question: the client's input
            raise ValidationFailed(f"the model's processor refused the request: {exc}", code="unprocessable_input",
                                   param="question") from exc
        check_embeddable(model, features)
        tokens = int(features["input_ids"].shape[1])
        limit = min(max_prompt_tokens, model.max_positions or max_prompt_tokens)
        if tokens > limit:
            raise ValidationFailed(f"the prompt is {tokens} tokens after processing (question and image); the "
                                   f"limit is {limit} tokens", code="prompt_too_long", param="question")
        return Prepared(image=image, features=pack(features) if pack is not None else features, tokens=tokens,
                        decode_s=t1 - t0, processor_s=time.perf_counter() - t1)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)


def check_plain_question(model: LoadedModel, question: str) -> None:
    """422 when the question holds one of the processor's reserved markers (its image placeholder, say) or a
    special token of its tokenizer: the processor or the model would take it for structure. An extra image
    placeholder made 13 of the 14 served families fail the request (a ValueError, a 500); Gemma 3's image
    soft token in a question failed the whole batch it ran in."""
    found = find_marker(model.processor, question)
    if found is not None:
        what, marker = found
        raise ValidationFailed(f"the question contains {marker!r}, {what}; a question is plain text and the "
                               "image goes in its own field", code="reserved_marker", param="question")


def check_embeddable(model: LoadedModel, features: Any) -> None:
    """422 when the prompt holds a token id past the model's embedding table: a tokenizer with added tokens
    the checkpoint never embedded (an IndexError in the middle of the batch, failing every row in it)."""
    rows = _embedding_rows(model.model)
    ids = features["input_ids"]
    if rows is not None and ids.numel() and int(ids.max()) >= rows:
        raise ValidationFailed(f"the question has a token (id {int(ids.max())}) outside this model's "
                               f"vocabulary of {rows} embeddings", code="unknown_token", param="question")


_EMBEDDING_ROWS: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


def _embedding_rows(module: Any) -> int | None:
    """Rows of the model's input embedding table, looked up once per model (the lookup walks submodules)."""
    try:
        return _EMBEDDING_ROWS[module]
    except KeyError:
        rows = getattr(module.get_input_embeddings(), "num_embeddings", None)
        _EMBEDDING_ROWS[module] = rows
        return rows


def _lower_priority(by: int = LARGE_NICENESS) -> None:
    """Run this thread `by` steps nicer than it was (at most 19): the large-image lane, so that a flood of the
    largest images decodes in the time ordinary requests and the model leave over, instead of taking a core
    from them; the preprocessing pool, so that the model goes first. Linux gives each thread its own
    niceness; Pillow's decoders and the Rust tokenizer release the GIL, so a descheduled thread there holds
    nobody up. Elsewhere this does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + by))
