"""Token streaming: a request's text deltas, from the batch worker's per-step callback to the client.

`open_stream` runs the ordinary inference path (`service.inference.infer`) as a task with a token sink on
its work item. The runner calls the sink on the worker thread as soon as a step makes new text final
(service/runner/sampling.py); the sink hops to the event loop, where the deltas queue up for the response.
The request shares its batch with others exactly as a non-streamed one does.

`open_stream` returns once the first delta exists, so everything that can fail before the first token —
admission (429), deadline (504), a bad image — is still an ordinary JSON error with its status code.
Closing the stream (the client went away) cancels the task: the request leaves the queue if it has not
started, or its row is finished at the next step of the running batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from service.batching.work import TokenSink
from service.inference import Outcome

_END = None  # queued after the last delta, when the inference task has finished (either way)


class TokenStream:
    def __init__(self, task: asyncio.Task[Outcome], queue: asyncio.Queue[str | None], first: str | None) -> None:
        self.task = task
        self._queue = queue
        self._first = first

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas in order; afterwards `outcome()` has the result (or raises the request's error)."""
        try:
            delta = self._first
            while delta is not _END:
                yield delta
                delta = await self._queue.get()
        finally:
            self.close()

    def outcome(self) -> Outcome:
        return self.task.result()

    def close(self) -> None:
        if not self.task.done():
            self.task.cancel()  # infer() withdraws or cancels the row (service/inference.py)


async def open_stream(start: Callable[[TokenSink], Coroutine[Any, Any, Outcome]]) -> TokenStream:
    """Start `start(sink)` and wait for its first delta; raises its error if it failed before any."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def sink(delta: str) -> None:  # worker thread; the loop keeps the order of these calls
        loop.call_soon_threadsafe(queue.put_nowait, delta)

    task = asyncio.ensure_future(start(sink))
    # Runs after every delta: the worker hands out its deltas before it resolves the request's future.
    task.add_done_callback(lambda _: queue.put_nowait(_END))
    try:
        first = await queue.get()
    except BaseException:
        task.cancel()
        raise
    if first is _END:
        task.result()  # the request's error, raised as an ordinary response
    return TokenStream(task, queue, first)
