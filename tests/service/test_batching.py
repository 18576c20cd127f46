"""Dynamic batching: the Batcher's rules on a fake runner, and batched answers equal to unbatched ones
through the real model (left padding, mixed question lengths, mixed max_new_tokens)."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
from PIL import Image

from eas.model.loading import load_model
from service.batching.batcher import Batcher, InferenceFailed
from service.batching.work import Generation, WorkItem
from service.errors import DeadlineExceeded, QueueFull, ServiceUnavailable
from tests.service.conftest import (
    TEST_DEVICE,
    TEST_DTYPE,
    Gate,
    ModelDirs,
    image_bytes,
    make_settings,
    multipart,
    running_app,
)

pytestmark = pytest.mark.anyio


class FakeRunner:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: list[WorkItem]) -> list[Generation]:
        self.batches.append([i.question for i in items])
        self.release.wait(10)
        return [Generation(text=i.question.upper(), prompt_tokens=1, completion_tokens=1, finish_reason="stop",
                           prepare_s=0.0, inference_s=0.0, batch_size=len(items)) for i in items]


def make_batcher(runner: FakeRunner, **overrides: float) -> Batcher:
    options = {"max_batch_size": 4, "max_batch_wait_s": 0.05, "max_queue_size": 8} | overrides
    return Batcher(runner, name="test", queue_full=lambda: QueueFull("full"), **options)  # type: ignore[arg-type]


def submit(batcher: Batcher, question: str, deadline_s: float = 10.0) -> WorkItem:
    loop = asyncio.get_running_loop()
    item = WorkItem(image=Image.new("RGB", (4, 4)), question=question, max_new_tokens=1,
                    deadline=time.monotonic() + deadline_s, loop=loop, future=loop.create_future())
    batcher.admit().enqueue(item)
    return item


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_batches_fill_up_to_max_size() -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_wait_s=0.2)
    # Queued before the worker starts: an idle worker dispatches at once (issue 18), so a worker already
    # running could take q0 alone before the others are submitted.
    items = [submit(batcher, f"q{i}") for i in range(6)]
    batcher.start()
    results = await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 5)
    assert [r.generation.text for r in results] == [f"Q{i}" for i in range(6)]
    assert runner.batches == [["q0", "q1", "q2", "q3"], ["q4", "q5"]]
    assert {r.generation.batch_size for r in results[:4]} == {4}
    batcher.stop()


async def test_an_idle_worker_dispatches_at_once() -> None:
    """Nothing else admitted: a lone request does not wait for the window (issue 18)."""
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_wait_s=5.0)
    batcher.start()
    t0 = time.monotonic()
    result = await asyncio.wait_for(submit(batcher, "alone").future, 5)
    assert result.generation.batch_size == 1
    assert time.monotonic() - t0 < 2.5  # well inside the 5 s window it would have waited before
    batcher.stop()


async def test_the_window_waits_for_requests_still_being_prepared() -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_wait_s=0.03)
    batcher.start()
    held = batcher.admit()  # admitted, still being prepared: the worker waits for it, up to the window
    t0 = time.monotonic()
    result = await asyncio.wait_for(submit(batcher, "first").future, 5)
    assert result.generation.batch_size == 1 and time.monotonic() - t0 >= 0.02  # it never came: window ran out
    held.release()

    slow = make_batcher(FakeRunner(), max_batch_wait_s=5.0)
    slow.start()
    held = slow.admit()
    first = submit(slow, "a")
    await asyncio.sleep(0.05)
    assert not first.future.done()  # waiting for the admitted request
    loop = asyncio.get_running_loop()
    second = WorkItem(image=Image.new("RGB", (4, 4)), question="b", max_new_tokens=1,
                      deadline=time.monotonic() + 10, loop=loop, future=loop.create_future())
    held.enqueue(second)
    results = await asyncio.wait_for(asyncio.gather(first.future, second.future), 5)
    assert [r.generation.batch_size for r in results] == [2, 2]  # ... and they ran together
    batcher.stop()
    slow.stop()


async def test_admission_bound_counts_admitted_not_started() -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, max_queue_size=2)  # not started: nothing leaves the queue
    held = batcher.admit()  # still decoding its image: counts
    submit(batcher, "a")
    with pytest.raises(QueueFull):
        batcher.admit()
    held.release()
    submit(batcher, "b")
    assert batcher.pending == 2


async def test_expired_items_fail_without_running() -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_wait_s=0.0)
    expired = submit(batcher, "late", deadline_s=-1)
    fresh = submit(batcher, "fresh")
    batcher.start()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(expired.future, 5)
    assert (await asyncio.wait_for(fresh.future, 5)).generation.text == "FRESH"
    assert runner.batches == [["fresh"]]
    batcher.stop()


async def test_withdraw_and_fail_all_and_stop() -> None:
    runner = FakeRunner()
    runner.release.clear()
    batcher = make_batcher(runner, max_batch_size=1, max_batch_wait_s=0.0)
    batcher.start()
    first = submit(batcher, "first")
    await wait_until(lambda: runner.batches)
    second, third = submit(batcher, "second"), submit(batcher, "third")
    assert batcher.withdraw(second) is True and batcher.withdraw(second) is False
    batcher.stop_accepting()
    with pytest.raises(ServiceUnavailable):
        batcher.admit()
    assert batcher.fail_all(lambda: ServiceUnavailable("bye")) == 2  # running "first" + queued "third"
    for item in (first, third):
        with pytest.raises(ServiceUnavailable):
            await item.future
    runner.release.set()
    batcher.stop()
    await asyncio.to_thread(batcher.join, 5)
    assert runner.batches == [["first"]]


class PoisonRunner(FakeRunner):
    """Fails any batch holding the question "poison" (as a model fails on a row it cannot run)."""

    def __init__(self, error: type[Exception] = ValueError) -> None:
        super().__init__()
        self.error = error

    def __call__(self, items: list[WorkItem]) -> list[Generation]:
        if any(i.question == "poison" for i in items):
            self.batches.append([i.question for i in items])
            raise self.error("this row cannot run")
        return super().__call__(items)


@pytest.mark.parametrize("isolate", [True, False])
async def test_one_bad_request_fails_alone(isolate: bool) -> None:
    """A batch that fails is run again one request at a time, so only the request that cannot run fails;
    without isolation (the negative control) every request batched with it fails too."""
    runner = PoisonRunner()
    batcher = Batcher(runner, name="test", queue_full=lambda: QueueFull("full"), max_batch_size=4,
                      max_batch_wait_s=0.05, max_queue_size=8,
                      isolate_failures=(lambda exc: isinstance(exc, ValueError)) if isolate else None)
    items = [submit(batcher, q) for q in ("a", "poison", "b")]
    batcher.start()
    results = await asyncio.wait_for(asyncio.gather(*(i.future for i in items), return_exceptions=True), 10)
    assert isinstance(results[1], InferenceFailed)
    if isolate:
        assert [r.generation.text for r in (results[0], results[2])] == ["A", "B"]
        assert runner.batches == [["a", "poison", "b"], ["a"], ["poison"], ["b"]]
    else:
        assert all(isinstance(r, InferenceFailed) for r in results)
        assert runner.batches == [["a", "poison", "b"]]
    batcher.stop()


async def test_a_failure_the_predicate_refuses_is_not_retried() -> None:
    """The model process gone (service/lifecycle.py's predicate) fails the batch as it is: a retry per
    request would only restart it again and again."""
    from service.lifecycle import _isolate_failure
    from service.runner.process import ModelProcessError, ModelProcessGone

    assert _isolate_failure(ValueError("x")) and _isolate_failure(ModelProcessError("the batch raised"))
    assert not _isolate_failure(ModelProcessGone("exited"))
    runner = PoisonRunner(ModelProcessGone)
    batcher = Batcher(runner, name="test", queue_full=lambda: QueueFull("full"), max_batch_size=4,
                      max_batch_wait_s=0.05, max_queue_size=8, isolate_failures=_isolate_failure)
    items = [submit(batcher, q) for q in ("a", "poison")]
    batcher.start()
    results = await asyncio.wait_for(asyncio.gather(*(i.future for i in items), return_exceptions=True), 10)
    assert all(isinstance(r, InferenceFailed) for r in results) and runner.batches == [["a", "poison"]]
    batcher.stop()


class SendingRunner(FakeRunner):
    """Calls `on_sent` once a batch is "sent", as ProcessRunner does once the child has it."""

    def __init__(self, fail: str | None = None) -> None:
        super().__init__()
        self.events: list[tuple[str, list[str]]] = []
        self.on_sent = None
        self.fail = fail

    def __call__(self, items: list[WorkItem]) -> list[Generation]:
        questions = [i.question for i in items]
        self.events.append(("sent", questions))
        if self.on_sent is not None:
            self.on_sent()
        if self.fail in questions:
            raise RuntimeError("the batch failed")
        return super().__call__(items)


def sending_batcher(runner: SendingRunner, defer: bool) -> Batcher:
    batcher = Batcher(runner, name="test", queue_full=lambda: QueueFull("full"), max_batch_size=2,
                      max_batch_wait_s=0.0, max_queue_size=8, defer_results=defer,
                      on_batch=lambda items, generations: runner.events.append(
                          ("resolved", [i.question for i in items])))
    runner.on_sent = batcher.flush_deferred
    return batcher


@pytest.mark.parametrize("defer", [True, False])
async def test_with_a_model_process_the_next_batch_is_sent_before_the_last_is_resolved(defer: bool) -> None:
    """defer_results (a model process): a batch's requests are resolved once the next batch is in the
    runner, so the child is not idle while the worker wakes the event loop; without it (the negative
    control) each batch is resolved before the next is sent."""
    runner = SendingRunner()
    batcher = sending_batcher(runner, defer)
    items = [submit(batcher, f"q{i}") for i in range(5)]
    batcher.start()
    results = await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 5)
    assert [r.generation.text for r in results] == [f"Q{i}" for i in range(5)]
    first, second, third = ["q0", "q1"], ["q2", "q3"], ["q4"]
    if defer:
        assert runner.events == [("sent", first), ("sent", second), ("resolved", first), ("sent", third),
                                 ("resolved", second), ("resolved", third)]
    else:
        assert runner.events == [("sent", first), ("resolved", first), ("sent", second), ("resolved", second),
                                 ("sent", third), ("resolved", third)]
    assert not batcher.busy
    batcher.stop()


async def test_held_back_results_never_wait_for_more_work_or_for_a_failing_batch() -> None:
    runner = SendingRunner(fail="bad")
    batcher = sending_batcher(runner, defer=True)
    batcher.start()
    lone = submit(batcher, "alone")  # nothing after it: answered while the worker waits for more
    assert (await asyncio.wait_for(lone.future, 5)).generation.text == "ALONE"
    runner.release.clear()  # hold the next batch in the runner so that two queue behind it
    items = [submit(batcher, "a")]
    await wait_until(lambda: len(runner.events) == 3)  # ["a"] is in the runner; the worker cannot take more
    items += [submit(batcher, q) for q in ("bad", "c")]  # ... so these two are the next batch, together
    runner.release.set()
    results = await asyncio.wait_for(asyncio.gather(*(i.future for i in items), return_exceptions=True), 5)
    assert runner.events[2:4] == [("sent", ["a"]), ("sent", ["bad", "c"])]
    assert results[0].generation.text == "A"  # resolved although the next batch failed
    assert all(isinstance(r, InferenceFailed) for r in results[1:])
    batcher.stop()


QUESTIONS = ["what colour is the circle?", "is there a red shape?", "what shape is it?",
             "what is in the image? answer in one word please", "colour?", "is the square blue or green?",
             "what colour is the rectangle in the middle of the picture?"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 30), (0, 128, 128), (120, 60, 20),
           (90, 90, 90)]


async def test_batched_answers_equal_unbatched(model_dirs: ModelDirs) -> None:
    """Hold the worker on a first request so the next seven queue up and run as ONE padded batch; each
    answer must equal the same request run alone (greedy, left-padded)."""
    gate = Gate()
    settings = make_settings(model_dirs, baseline_path=None, max_batch_size=8, max_batch_wait_ms=50)
    pngs = [image_bytes(c, size=(40 + 9 * i, 32 + 5 * i), shape="ellipse" if i % 2 else "rect")
            for i, c in enumerate(COLOURS)]
    tokens = [8, 3, 8, 5, 8, 1, 8]
    async with running_app(settings, loader=gate.loader()) as (app, client):
        gate.batches.clear()
        gate.close()
        first = asyncio.create_task(client.post("/v1/answer", **multipart(pngs[0], QUESTIONS[0])))
        await asyncio.to_thread(gate.started.wait, 10)
        batcher = app.state.service.registry.get("eas").batcher
        rest = [asyncio.create_task(client.post("/v1/answer", **multipart(
            png, q, max_new_tokens=str(n)))) for png, q, n in zip(pngs, QUESTIONS, tokens, strict=True)]
        await wait_until(lambda: batcher.pending == len(rest))
        gate.open()
        responses = [await first, *(await asyncio.gather(*rest))]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert gate.batches == [1, 7]
    direct = load_model(model_dirs.eas, device=TEST_DEVICE, dtype=TEST_DTYPE)
    for response, png, question, n in zip(responses[1:], pngs, QUESTIONS, tokens, strict=True):
        alone = direct.answer([Image.open(io.BytesIO(png))], [question], max_new_tokens=n)[0]
        assert response.json()["answer"] == alone, question
