"""uvicorn with the drain order of serving-conventions §5.

Plain uvicorn closes its listening socket on SIGTERM and only then runs the lifespan shutdown, so clients
see refused connections rather than 503s, and readiness never turns 503 while work is still in flight.
`DrainingServer` inserts the drain first: on the first SIGTERM/SIGINT readiness and new requests turn 503
at once, queued and running requests finish (up to `shutdown_timeout_s`), leftovers get 503, and only then
does uvicorn's own shutdown start. A second signal skips the wait (uvicorn's usual behaviour).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from types import FrameType

import uvicorn

from service.lifecycle import Service

log = logging.getLogger("service.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # second signal, or not serving yet: uvicorn's own behaviour
            return
        self._draining = True
        self._captured_signals.append(sig)  # uvicorn re-raises captured signals after a clean exit
        log.info("signal %s: draining before shutdown", sig)
        # Signal handlers may run in the middle of a loop callback (or on another thread in tests):
        # only schedule work here.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._start_drain)

    def request_drain(self) -> None:
        """What SIGTERM does, callable from any thread (tests, embedding)."""
        self.handle_exit(15, None)

    def _start_drain(self) -> None:
        self.service.begin_drain()  # readiness 503 now, not after the task gets scheduled
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.service.drain()
        finally:
            self.should_exit = True
