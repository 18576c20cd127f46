"""A per-variant dynamic batcher: bounded admission, batch gathering, one worker thread.

The event loop only admits, enqueues and awaits futures; all model work happens on the batcher's own
thread, so a forward pass never blocks other requests' I/O.

When the worker is free it takes what is queued at once: requests that arrived while a batch ran have
already waited for it, and a lone request gains nothing by waiting (issue 18: the fixed window was most
of the gap to LitServe at one client). The window (`max_batch_wait_s`, from the first request's enqueue)
is spent only while other admitted requests are still being prepared (image decode, processor): they
are known to be on their way, and waiting for them saves a batch. A batch also closes at `max_batch_size`.

A model process whose weights the HTTP process shares (`run_here`: service/runner/shared_weights.py) has a
request that finds the batcher idle run in this process by the worker, without the crossing to the model
process and back (a tenth of a one-client request measured on the 2-core machine). Batches go to the model
process, and so does a request that arrives while it runs, at once (from the event loop, as below), so the
two run side by side.

Otherwise, a runner that can take a batch from the event loop itself (`submit`: the model process,
service/runner/process.py) gets a request that finds the batcher idle (nothing queued, admitted or running)
straight from the loop: the worker's wake-up and the hand-back to the loop are two thread hand-offs, each
paid on a one-request path that has nothing to batch (issue 18). Everything else goes through the worker.

Queue capacity counts admitted requests that have not started yet, including those still decoding
their image: admission is decided before any decoding (serving-conventions §2), so a flood of large
images cannot pile up in memory behind a "full" queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable

from service.batching.work import Completed, Generation, WorkItem
from service.errors import DeadlineExceeded, ServiceError, ServiceUnavailable

log = logging.getLogger(__name__)

BatchFn = Callable[[list[WorkItem]], list[Generation]]
# Called on the event loop with a batch and a callback; True when the runner took the batch, and it then
# calls the callback once, on the loop, with the batch's generations or the exception that failed it.
# False: it cannot take one now (busy, or its model process must be started first); the worker runs it.
SubmitFn = Callable[[list[WorkItem], Callable[[list[Generation] | BaseException], None]], bool]
# Told about every batch that ran, with its requests and results, before they are answered (metrics).
BatchObserver = Callable[[list[WorkItem], list[Generation]], None]


# Below this many tokens per row, padding is cheap: lengths are not bucketed (issue 17, H1).
BUCKET_FLOOR_TOKENS = 256


def fits_batch(batch: list[WorkItem], item: WorkItem, max_batch_tokens: int | None) -> bool:
    """May `item` join `batch`? Every row is padded to the longest prompt, so the batch's padded tokens
    (rows × longest) must stay within the budget, and lengths beyond BUCKET_FLOOR_TOKENS must be within 2x
    of each other: one long prompt runs with similar ones instead of padding many short ones. Items of
    unknown length (tokens 0) always fit."""
    if max_batch_tokens is None or not item.tokens:
        return True
    lengths = [i.tokens for i in batch if i.tokens] + [item.tokens]
    longest, shortest = max(lengths), min(lengths)
    if (len(batch) + 1) * longest > max_batch_tokens:
        return False
    return longest <= max(2 * shortest, BUCKET_FLOOR_TOKENS)


class InferenceFailed(ServiceError):
    status, code, type = 500, "inference_failed", "server_error"


class Admission:
    """One reserved queue slot; becomes a queued item (`enqueue`) or is given back (`release`)."""

    __slots__ = ("_batcher", "_open")

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self._open = True

    def enqueue(self, item: WorkItem) -> None:
        if not self._open:
            raise RuntimeError("admission already used")
        self._open = False
        self._batcher._enqueue_admitted(item)

    def release(self) -> None:
        if self._open:
            self._open = False
            self._batcher._release_admission()


class Batcher:
    def __init__(
        self,
        run_batch: BatchFn,
        *,
        name: str,
        max_batch_size: int,
        max_batch_wait_s: float,
        max_queue_size: int,
        queue_full: Callable[[], ServiceError],
        on_batch: BatchObserver | None = None,
        on_depth: Callable[[int], None] | None = None,
        max_batch_tokens: int | None = None,
        isolate_failures: Callable[[Exception], bool] | None = None,
        submit: SubmitFn | None = None,
        defer_results: bool = False,
        run_here: BatchFn | None = None,
    ) -> None:
        self.name = name
        self._run_here = run_here
        self.ran_here = 0  # requests run by `run_here` (a count for tests and benchmarks)
        # With a model process the worker hands the next batch to the child before it resolves the one that
        # just came back (`flush_deferred`, called by the runner once the next batch is sent): resolving
        # wakes the event loop once per request, and each wake-up made the worker wait its turn for the
        # interpreter lock while the child sat idle (docs/serving.md, "The model process").
        self._defer = defer_results
        self._deferred: list[tuple[list[WorkItem], list[Generation]]] = []
        # After a batch of several rows fails with an exception this accepts, each row runs once alone: a
        # request the model cannot run fails by itself instead of failing every request batched with it.
        # (The lifecycle leaves out failures that are the model process's, where a retry restarts it.)
        self._isolate = isolate_failures
        self.max_batch_tokens = max_batch_tokens  # padded-token budget of a batch (None: no budget)
        self._run_batch = run_batch
        self._submit = submit
        self.sent_from_loop = 0  # batches the runner took from the event loop (a count for tests and benchmarks)
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.max_queue_size = max_queue_size
        self._queue_full = queue_full
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._cond = threading.Condition()
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._reserved = 0
        self._running: list[WorkItem] = []
        self._running_here: WorkItem | None = None  # the worker's `run_here` request (beside `_running`)
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)

    # --- event-loop side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def admit(self) -> Admission:
        """Reserve a queue slot now, or refuse at once (429, or 503 when closed)."""
        with self._cond:
            if not self._accepting:
                raise ServiceUnavailable("the server is shutting down", code="draining")
            if self._reserved + len(self._queue) >= self.max_queue_size:
                raise self._queue_full()
            self._reserved += 1
            depth = self._reserved + len(self._queue)
        self._report_depth(depth)
        return Admission(self)

    def withdraw(self, item: WorkItem) -> bool:
        """Take a request out of the queue if it has not started (client gone, deadline passed)."""
        with self._cond:
            try:
                self._queue.remove(item)
            except ValueError:
                return False
            depth = self._reserved + len(self._queue)
        self._report_depth(depth)
        return True

    @property
    def pending(self) -> int:
        """Admitted requests not yet started (decoding or queued)."""
        with self._cond:
            return self._reserved + len(self._queue)

    def alone(self) -> bool:
        """Is one admitted request (the caller's) all there is: nothing else admitted, queued or running?"""
        with self._cond:
            return (self._reserved == 1 and not self._queue and not self._running and not self._deferred
                    and self._running_here is None)

    @property
    def runs_lone_here(self) -> bool:
        """Does a request that finds this batcher idle run in this process (`run_here`)?"""
        return self._run_here is not None

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._reserved or self._queue or self._running or self._deferred or self._running_here)

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait (without blocking the loop) until nothing is admitted, queued or running."""
        deadline = time.monotonic() + timeout_s
        while self.busy:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def fail_all(self, exc_factory: Callable[[], BaseException]) -> int:
        """Fail every queued and running request (the running batch's results will be dropped)."""
        with self._cond:
            victims = [*self._queue, *self._running, *(item for batch, _ in self._deferred for item in batch),
                       *([self._running_here] if self._running_here is not None else [])]
            self._queue.clear()
            depth = self._reserved
        for item in victims:
            item.fail(exc_factory())
        self._report_depth(depth)
        return len(victims)

    def stop(self) -> None:
        """Let the worker exit once its queue is empty; it is a daemon, so a stuck batch cannot hang exit."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # --- called through Admission ------------------------------------------------------------------

    def _enqueue_admitted(self, item: WorkItem) -> None:
        direct = False
        with self._cond:
            self._reserved -= 1
            if self._stopping:
                closed = True
            else:
                closed = False
                item.enqueued_at = time.monotonic()
                idle = not (self._queue or self._running or self._reserved)
                if idle and self._run_here is not None and self._running_here is None:
                    item.here = True
                    self._queue.append(item)
                    self._cond.notify()
                elif idle and self._submit is not None and _on_loop(item.loop):
                    item.started_at = item.enqueued_at
                    self._running = [item]  # the worker waits until this batch is over
                    direct = True
                else:
                    self._queue.append(item)
                    self._cond.notify()
            depth = self._reserved + len(self._queue)
        if direct and not self._dispatch_from_loop(item):
            with self._cond:  # the runner could not take it: the worker runs it instead
                item.started_at = None
                self._running = []
                self._queue.append(item)
                self._cond.notify()
        self._report_depth(depth)
        if closed:
            raise ServiceUnavailable("the server is shutting down", code="draining")

    def _dispatch_from_loop(self, item: WorkItem) -> bool:
        assert self._submit is not None
        batch = [item]

        def done(outcome: list[Generation] | BaseException) -> None:
            with self._cond:
                self._running = []
                if self._queue:  # requests that arrived meanwhile wait for the worker; else it has nothing to do
                    self._cond.notify()  # (a needless wake-up costs a thread switch on the one-request path)
            if isinstance(outcome, BaseException):
                log.error("batcher %s: request %s failed (%s: %s)", self.name, item.request_id,
                          type(outcome).__name__, outcome)
                item.fail(InferenceFailed("inference failed; see the server log for this request id"))
            elif len(outcome) != len(batch):
                log.error("batcher %s: runner returned %d results for 1 request", self.name, len(outcome))
                item.fail(InferenceFailed("inference failed; see the server log for this request id"))
            else:
                self._finish(batch, outcome, on_loop=True)

        try:
            taken = self._submit(batch, done)
        except Exception:
            log.exception("batcher %s: the runner refused a batch from the event loop", self.name)
            return False
        self.sent_from_loop += taken
        return taken

    def _release_admission(self) -> None:
        with self._cond:
            self._reserved -= 1
            if self._queue:  # only then may the worker be waiting for this request to fill a batch (_next_batch)
                self._cond.notify()
            depth = self._reserved + len(self._queue)
        self._report_depth(depth)

    # --- worker thread -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch, expired = self._next_batch()
            if batch is None:
                self.flush_deferred()
                return
            for item in expired:
                item.fail(DeadlineExceeded("the request's deadline passed while it was queued"))
            if batch:
                self._execute(batch)

    def _next_batch(self) -> tuple[list[WorkItem] | None, list[WorkItem]]:
        with self._cond:
            while not self._queue or self._running:  # _running here: a batch sent from the loop
                if self._stopping and not self._queue:
                    return None, []
                self._wait()
            fill_until = self._queue[0].enqueued_at + self.max_batch_wait_s
            while len(self._queue) < self.max_batch_size and self._reserved > 0 and not self._stopping:
                remaining = fill_until - time.monotonic()
                if remaining <= 0 or not self._queue:
                    break
                self._wait(remaining)  # woken by each enqueue and each released admission
            now = time.monotonic()
            batch: list[WorkItem] = []
            expired: list[WorkItem] = []
            later: list[WorkItem] = []  # too long or too short for this batch: first in line for the next
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue.popleft()
                if item.deadline <= now:
                    expired.append(item)  # never run work nobody will wait for
                    continue
                if batch and not fits_batch(batch, item, self.max_batch_tokens):
                    later.append(item)
                    continue
                item.started_at = now
                batch.append(item)
            self._queue.extendleft(reversed(later))
            if len(batch) == 1 and batch[0].here:  # marked only where there is a `run_here`
                self._running_here = batch[0]  # the loop may send what arrives meanwhile to the model process
            else:
                self._running = batch
            depth = self._reserved + len(self._queue)
        self._report_depth(depth)
        return batch, expired

    def _wait(self, timeout_s: float | None = None) -> None:
        """`self._cond.wait`, except that results held back (`defer_results`) are resolved first instead: the
        worker never waits while requests whose answers exist wait for it. Returns without waiting then; the
        caller checks its condition again."""
        if not self._deferred:
            self._cond.wait(timeout_s)
            return
        self._cond.release()
        try:
            self.flush_deferred()
        finally:
            self._cond.acquire()

    def flush_deferred(self) -> None:
        """Resolve the batches held back (worker thread; the runner calls it once the next batch is sent)."""
        while True:
            with self._cond:
                if not self._deferred:
                    return
                batch, generations = self._deferred.pop(0)
            self._finish(batch, generations)

    def _execute(self, batch: list[WorkItem]) -> None:
        if self._running_here is not None and batch == [self._running_here]:
            self._execute_here(batch[0])
            return
        try:
            try:
                generations = self._run_checked(batch)
            except Exception as exc:
                self.flush_deferred()  # the batch before this one has its answers: whatever happens to this one
                ids = [item.request_id for item in batch]
                if len(batch) > 1 and self._isolate is not None and self._isolate(exc):
                    log.warning("batcher %s: batch of %d failed (%s: %s); running its requests one by one "
                                "(request ids %s)", self.name, len(batch), type(exc).__name__, exc, ids)
                    for item in batch:
                        self._run_alone(item)
                    return
                log.exception("batcher %s: batch of %d failed (request ids %s)", self.name, len(batch), ids)
                for item in batch:
                    item.fail(InferenceFailed("inference failed; see the server log for this request id"))
            else:
                if self._defer:
                    with self._cond:
                        self._deferred.append((batch, generations))
                else:
                    self._finish(batch, generations)
        finally:
            with self._cond:
                self._running = []

    def _execute_here(self, item: WorkItem) -> None:
        self.flush_deferred()  # a model-process batch's answers are not held back behind this one
        self.ran_here += 1
        try:
            generations = self._run_checked([item], self._run_here)
        except Exception:
            log.exception("batcher %s: request %s failed", self.name, item.request_id)
            item.fail(InferenceFailed("inference failed; see the server log for this request id"))
        else:
            self._finish([item], generations)
        finally:
            with self._cond:
                self._running_here = None

    def _run_checked(self, batch: list[WorkItem], run: BatchFn | None = None) -> list[Generation]:
        generations = (run or self._run_batch)(batch)
        if len(generations) != len(batch):
            raise RuntimeError(f"runner returned {len(generations)} results for {len(batch)} requests")
        return generations

    def _run_alone(self, item: WorkItem) -> None:
        if item.cancelled.is_set() or item.deadline <= time.monotonic():  # nobody waits for it any more
            item.fail(DeadlineExceeded("the request's deadline passed while it was running"))
            return
        try:
            generations = self._run_checked([item])
        except Exception:
            log.exception("batcher %s: request %s failed on its own", self.name, item.request_id)
            item.fail(InferenceFailed("inference failed; see the server log for this request id"))
        else:
            self._finish([item], generations)

    def _finish(self, batch: list[WorkItem], generations: list[Generation], on_loop: bool = False) -> None:
        if self._on_batch is not None:
            try:  # a metrics problem must never fail requests whose answers exist
                self._on_batch(batch, generations)
            except Exception:
                log.exception("batcher %s: batch observer failed", self.name)
        for item, generation in zip(batch, generations, strict=True):
            assert item.started_at is not None
            completed = Completed(generation, queue_s=item.started_at - item.enqueued_at)
            if on_loop:
                item.resolve_here(completed)
            else:
                item.resolve(completed)

    def _report_depth(self, depth: int) -> None:
        if self._on_depth is not None:
            self._on_depth(depth)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Is this thread running `loop` (only there may a batch be sent from the loop)?"""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
