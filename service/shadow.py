"""Shadow traffic: mirror a sampled fraction of answered `eas` requests to `baseline`, off the response
path, to compare the two variants on the same live inputs (serving-conventions §9).

- Sampling happens once the `eas` answer exists; the mirror is scheduled with `loop.call_soon`, so it
  runs only after the request handler has handed its response on (it never waits for the baseline).
- The mirrored request reuses the decoded image and goes through the baseline's own batcher, so it is
  batched, deadline-checked and drained like any other request, but it is never returned to a client and
  is not counted in `eas_requests_total` / `eas_request_duration_seconds`.
- Mirroring is suspended while the baseline queue holds `shadow_max_queue_depth` requests (or is closed
  or draining): shadow work may add at most that much queueing to real baseline traffic.
- Mirrored items are marked (`WorkItem.shadow`): a baseline batch holding one is labelled
  `traffic="shadow"` in `eas_batch_inference_duration_seconds` and left out of `eas_batch_size`, so the
  mirrors never pass for real baseline traffic in the live comparison (docs/observability.md).
- Recorded: the baseline's generation time in `eas_shadow_inference_duration_seconds`, answer agreement
  in `eas_shadow_agreement_total{result="match|mismatch"}`, and every sampled request's fate in
  `eas_shadow_requests_total{outcome}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from service.batching.batcher import Batcher
from service.batching.work import Generation, WorkItem
from service.errors import DeadlineExceeded, NotFound, ServiceError
from service.lifecycle import Service
from service.metrics import Metrics
from service.runner.registry import ServedVariant
from service.settings import Settings

log = logging.getLogger(__name__)

LIVE_VARIANT = "eas"
SHADOW_VARIANT = "baseline"


def same_answer(a: str, b: str) -> bool:
    """Answers agree when equal up to case and whitespace (greedy decoding: no sampling noise)."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


class ShadowMirror:
    def __init__(
        self,
        service: Service,
        metrics: Metrics,
        *,
        fraction: float,
        max_queue_depth: int,
        deadline_s: float,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.fraction = fraction
        self.max_queue_depth = max_queue_depth
        self.deadline_s = deadline_s
        self._sample = sample
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_settings(cls, service: Service, metrics: Metrics, settings: Settings) -> ShadowMirror:
        return cls(service, metrics, fraction=settings.shadow_fraction,
                   max_queue_depth=settings.shadow_max_queue_depth,
                   deadline_s=settings.default_deadline_ms / 1000.0)

    @property
    def pending(self) -> int:
        """Mirrored requests not finished yet."""
        return len(self._tasks)

    def consider(self, served: ServedVariant, item: WorkItem, live: Generation) -> None:
        """Called with every answered request; samples `eas` ones. Returns at once (event loop only)."""
        if self._closed or self.fraction <= 0.0 or served.variant != LIVE_VARIANT:
            return
        if self._sample() >= self.fraction:
            return
        asyncio.get_running_loop().call_soon(self._mirror, served.info.model, item, live.text)

    def _mirror(self, model: str, item: WorkItem, live_text: str) -> None:
        suspended = self.metrics.shadow_requests.labels(model, "suspended")
        if self._closed or not self.service.ready:
            suspended.inc()
            return
        try:
            target = self.service.registry.get(SHADOW_VARIANT)
        except NotFound:
            suspended.inc()  # nothing to compare with (a baseline-less deployment)
            return
        batcher = target.batcher
        if batcher.pending >= self.max_queue_depth:
            suspended.inc()
            return
        loop = asyncio.get_running_loop()
        shadow = WorkItem(image=item.image, question=item.question, max_new_tokens=item.max_new_tokens,
                          deadline=time.monotonic() + self.deadline_s, loop=loop, future=loop.create_future(),
                          request_id=f"{item.request_id}.shadow" if item.request_id else None, shadow=True)
        try:
            admission = batcher.admit()
        except ServiceError:  # full or closing: real traffic comes first
            suspended.inc()
            return
        try:
            admission.enqueue(shadow)
        except ServiceError:
            suspended.inc()
            return
        finally:
            admission.release()  # no-op once enqueued
        task = loop.create_task(self._complete(model, target, shadow, live_text), name="shadow")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _complete(self, model: str, target: ServedVariant, item: WorkItem, live_text: str) -> None:
        m = self.metrics
        try:
            # The batcher fails an item that expires in its queue; one that overruns while running is
            # given a little slack before it is written off.
            completed = await asyncio.wait_for(item.future, max(0.0, item.deadline - time.monotonic()) + 1.0)
        except (TimeoutError, DeadlineExceeded):
            _withdraw(target.batcher, item)
            m.shadow_requests.labels(model, "expired").inc()
            return
        except asyncio.CancelledError:
            _withdraw(target.batcher, item)
            raise
        except Exception as exc:  # a failed shadow must never surface anywhere but its counter and the log
            m.shadow_requests.labels(model, "failed").inc()
            log.warning("shadow request %s failed: %s", item.request_id, exc)
            return
        generation = completed.generation
        m.shadow_requests.labels(model, "completed").inc()
        m.shadow_inference_duration.labels(model, target.variant).observe(generation.inference_s)
        result = "match" if same_answer(generation.text, live_text) else "mismatch"
        m.shadow_agreement.labels(model, result).inc()

    async def close(self) -> None:
        """Stop mirroring and abandon what is still queued or running (lifespan shutdown). During a drain no
        new mirror starts (the service is not ready); the few already queued finish like other work."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _withdraw(batcher: Batcher, item: WorkItem) -> None:
    batcher.withdraw(item)
    item.future.cancel()
