"""The unit of work that travels from a request handler (event loop) to a batch worker (thread) and back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens and when it stops (besides `max_new_tokens` and end of sequence).

    `temperature == 0` is greedy (top_p and seed then change nothing). Without a seed a sampled request
    draws a fresh one."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain(self) -> bool:
        """Greedy with no stop conditions: the batch may take the unmodified generation path."""
        return self.greedy and not self.stop and not self.stop_token_ids


GREEDY = Sampling()

TokenSink = Callable[[str], None]  # receives a streamed request's text deltas, on the worker thread


@dataclass(frozen=True)
class Generation:
    """What the runner produced for one request of a batch."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (max_new_tokens reached)
    prepare_s: float  # processor time of the whole batch (each request waited for all of it)
    inference_s: float  # generation + decode time of the whole batch
    batch_size: int
    # The batch's model phases in seconds ("vision_encoder", "prefill", "decode"; those measured), shared
    # by its rows: see service/runner/phases.py for what each covers.
    phases: dict[str, float] = field(default_factory=dict)
    # When this row's first token existed (time.monotonic()), and the mean time between its later tokens:
    # the time-to-first-token and time-per-output-token metrics (None where there was no such token).
    first_token_at: float | None = None
    tpot_s: float | None = None
    # Prompt tokens the decoder ran for this row: `prompt_tokens` less the image tokens a visual-token
    # reduction removed (eas/model/token_reduction.py); None means "the same as prompt_tokens".
    decoder_prompt_tokens: int | None = None


@dataclass(frozen=True)
class Completed:
    """A generation plus the queueing facts only the batcher knows."""

    generation: Generation
    queue_s: float


class CancelFlag(threading.Event):
    """A WorkItem's `cancelled`: an Event whose `set` also calls the hooks a runner watches it with, so a model
    process hears of a cancellation at once, without polling for it (service/runner/process.py)."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[Callable[[], None]] = []
        self._hooks_lock = threading.Lock()

    def set(self) -> None:
        super().set()
        with self._hooks_lock:
            hooks = list(self._hooks)
        for hook in hooks:
            _call_hook(hook)

    def watch(self, hook: Callable[[], None]) -> None:
        """Call `hook` when the flag is set (now, if it already is)."""
        with self._hooks_lock:
            self._hooks.append(hook)
        if self.is_set():
            _call_hook(hook)

    def unwatch(self, hook: Callable[[], None]) -> None:
        with self._hooks_lock, contextlib.suppress(ValueError):
            self._hooks.remove(hook)


def _call_hook(hook: Callable[[], None]) -> None:
    try:  # whoever cancels (a deadline, a disconnect) must not fail because a runner's hook did
        hook()
    except Exception:
        logging.getLogger(__name__).exception("a cancellation hook failed")


@dataclass(eq=False)  # identity equality: items are removed from the queue by identity
class WorkItem:
    image: Image.Image
    question: str
    max_new_tokens: int
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Completed]
    request_id: str | None = None
    # A mirrored request (service/shadow.py): answered to nobody; its batch is labelled traffic="shadow".
    shadow: bool = False
    sampling: Sampling = GREEDY
    sink: TokenSink | None = None  # set for a streamed request (service/streaming.py)
    # The processor's tensors for this request alone (service/preprocess.py), batched by the runner; None:
    # the runner prepares it (warm-up, shadow mirrors). `tokens`: its prompt length, 0 when not known.
    features: Any = None
    tokens: int = 0
    # Set when nobody waits for the result any more: a running batch on the per-step path (sampling, stop
    # options, streaming) finishes this row at its next step; a plain greedy batch ends once all its rows are.
    cancelled: CancelFlag = field(default_factory=CancelFlag)
    enqueued_at: float = 0.0
    started_at: float | None = None
    # Found its variant idle, and the batcher has a `run_here`: the worker runs it in this process.
    here: bool = False

    # Results cross from the worker thread to the loop; a future whose waiter already gave up
    # (cancelled on timeout or disconnect) is left alone so nothing logs "exception never retrieved".
    def resolve(self, result: Completed) -> None:
        self._call(_set_result, result)

    def fail(self, exc: BaseException) -> None:
        self._call(_set_exception, exc)

    def resolve_here(self, result: Completed) -> None:
        """`resolve`, called on the item's own event loop (a batch sent from the loop): no hand-off needed."""
        _set_result(self.future, result)

    def _call(self, fn: Any, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
            self.loop.call_soon_threadsafe(fn, self.future, value)


def _set_result(future: asyncio.Future[Completed], value: Completed) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Completed], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
