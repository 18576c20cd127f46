"""The path every inference request takes once its fields are valid: admission → preprocessing pool (image
decode, processor, prompt-token limit: service/preprocess.py) → batcher queue → (worker thread: runner →
model) → result, with the deadline and the client's connection watched the whole time.

Both the native `/v1/answer` and the OpenAI-compatible route call `infer`; they differ only in how they
parse requests and shape responses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import Request

from service.batching.batcher import Batcher
from service.batching.work import GREEDY, Completed, Generation, Sampling, TokenSink, WorkItem
from service.errors import ClientDisconnected, DeadlineExceeded, QueueFull, ServiceUnavailable
from service.metrics import Metrics
from service.runner.registry import ServedVariant
from service.validation.images import ImageLimits
from service.validation.payloads import DEADLINE_HEADER


@dataclass(frozen=True)
class Outcome:
    served: ServedVariant
    generation: Generation
    queue_s: float
    preprocess_s: float
    inference_s: float
    total_s: float

    def timings(self) -> dict[str, float]:
        return {"queue_s": round(self.queue_s, 6), "preprocess_s": round(self.preprocess_s, 6),
                "inference_s": round(self.inference_s, 6), "total_s": round(self.total_s, 6)}

    def headers(self) -> dict[str, str]:
        """`x-model-variant` and W3C Server-Timing (milliseconds, as that header defines)."""
        server_timing = ", ".join(
            f"{name};dur={seconds * 1000:.3f}"
            for name, seconds in (("queue", self.queue_s), ("preprocess", self.preprocess_s),
                                  ("inference", self.inference_s), ("total", self.total_s))
        )
        return {"x-model-variant": self.served.variant, "server-timing": server_timing}


def mark_variant(request: Request, served: ServedVariant) -> None:
    """Label this request's metrics (read by the request middleware) with the chosen variant."""
    request.state.variant = served.variant
    request.state.model = served.info.model


async def infer(
    request: Request,
    served: ServedVariant,
    *,
    image_bytes: bytes,
    question: str,
    max_new_tokens: int,
    deadline: float,
    limits: ImageLimits,
    metrics: Metrics,
    sampling: Sampling = GREEDY,
    sink: TokenSink | None = None,
) -> Outcome:
    mark_variant(request, served)
    labels = {"model": served.info.model, "variant": served.variant}
    if time.monotonic() >= deadline:
        raise DeadlineExceeded("the request's deadline passed before it was queued")
    admission = served.batcher.admit()  # 429 here, before any image decoding
    try:
        metrics.image_bytes.labels(**labels).observe(len(image_bytes))
        # Decode, checks and the processor run in the bounded preprocessing pool (service/preprocess.py), or
        # for a small image on an idle server right here; only the model on the batch worker.
        service = request.app.state.service
        alone = served.batcher.alone()
        # Features are packed for the model process where they are prepared, except a lone request's on a
        # batcher that runs lone requests in this process: it would be unpacked again right here.
        pack = None if alone and served.batcher.runs_lone_here else getattr(served.runner, "pack", None)
        try:
            prepared = await service.preprocessor.prepare(
                served.runner.model, image_bytes, question, limits=limits,
                max_prompt_tokens=service.settings.max_prompt_tokens, deadline=deadline, alone=alone, pack=pack)
        except DeadlineExceeded:
            raise _starved(request) from None  # admitted, then waited out its deadline before decoding
        decode_s = prepared.decode_s + prepared.processor_s
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed while its image was decoded")
        loop = asyncio.get_running_loop()
        item = WorkItem(image=prepared.image, question=question, max_new_tokens=max_new_tokens, deadline=deadline,
                        loop=loop, future=loop.create_future(), request_id=request.state.request_id,
                        sampling=sampling, sink=sink, features=prepared.features, tokens=prepared.tokens)
        admission.enqueue(item)
    finally:
        admission.release()  # no-op once enqueued
    completed = await _wait_for_result(request, served.batcher, item, metrics)
    generation = completed.generation
    preprocess_s = decode_s + generation.prepare_s
    metrics.queue_duration.labels(**labels).observe(completed.queue_s)
    metrics.preprocess_duration.labels(**labels).observe(preprocess_s)
    metrics.observe_generation(served.info.model, served.variant, generation)
    ttft = None if generation.first_token_at is None else generation.first_token_at - request.state.started_at
    metrics.observe_token_latency(served.info.model, served.variant, ttft, generation.tpot_s)
    shadow = getattr(request.app.state, "shadow", None)
    # Mirrors a sample to the baseline in the background (never waited for here); only greedy unstopped
    # answers, the ones a greedy mirror can agree with.
    if shadow is not None and sampling.plain:
        shadow.consider(served, item, generation)
    return Outcome(served=served, generation=generation, queue_s=completed.queue_s, preprocess_s=preprocess_s,
                   inference_s=generation.inference_s,
                   total_s=time.monotonic() - request.state.started_at)


async def _wait_for_result(request: Request, batcher: Batcher, item: WorkItem, metrics: Metrics) -> Completed:
    """The item's result, or 504 at its deadline, or ClientDisconnected; a request that gives up is taken
    out of the queue if it has not started, so abandoned work is never run."""
    disconnect = asyncio.ensure_future(_client_disconnected(request))
    try:
        done, _ = await asyncio.wait((item.future, disconnect), timeout=max(0.0, item.deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if item.future in done:
            try:
                return item.future.result()
            except DeadlineExceeded:
                if item.started_at is None:
                    raise _starved(request) from None
                raise
        withdrawn = batcher.withdraw(item)
        item.cancelled.set()  # a running batch on the per-step path drops this row at its next step
        item.future.cancel()
        if disconnect in done:
            metrics.rejected.labels(reason="client_disconnected").inc()
            raise ClientDisconnected()
        if withdrawn or item.started_at is None:
            raise _starved(request)
        raise DeadlineExceeded("the request's deadline passed while it was running")
    except asyncio.CancelledError:
        batcher.withdraw(item)
        item.cancelled.set()
        item.future.cancel()
        raise
    finally:
        disconnect.cancel()


def _starved(request: Request) -> Exception:
    """A request admitted and then never started before its deadline. With the client's own deadline
    (X-Request-Deadline-Ms) that is its 504; with the server's default it means overload, which is
    answered like a full queue: 429 (or 503, Settings.queue_full_status) with Retry-After, never a 504 for
    work the server took on (issue 17)."""
    if request.headers.get(DEADLINE_HEADER) is not None:
        return DeadlineExceeded("the request's deadline passed while it was queued")
    settings = request.app.state.settings
    error = QueueFull if settings.queue_full_status == 429 else ServiceUnavailable  # as for a full queue
    return error("the server is overloaded: the request waited its whole deadline in the queue; retry later",
                 code="overloaded", headers={"Retry-After": str(settings.retry_after_s)})


async def _client_disconnected(request: Request) -> None:
    """Returns when the server reports the client gone. The body has been read by now, so the next
    ASGI message can only be `http.disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
