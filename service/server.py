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
import threading
import time
from collections.abc import Iterator
from types import FrameType

import httpx
import uvicorn
from fastapi import FastAPI

from service.lifecycle import Service

log = logging.getLogger(__name__)


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
        if self._draining and self._loop is not None:  # second signal: stop waiting for the drain
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.service.hurry_drain)
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


@contextlib.contextmanager
def background_server(
    app: FastAPI, *, host: str = "127.0.0.1", startup_timeout_s: float = 120.0, log_level: str = "warning"
) -> Iterator[tuple[str, DrainingServer]]:
    """Serve `app` with a DrainingServer on an OS-chosen port in a daemon thread (tests, benchmarks).

    Yields `(base_url, server)` once `/health/ready` answers 200; raises if it never does. On exit the
    server is stopped and its thread joined (bounded).
    """
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets whose proto says TCP, and
    # without it Nagle + delayed ACKs add ~40 ms to every response written in two parts.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    base_url = f"http://{host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    server = DrainingServer(config, app.state.service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    try:
        with httpx.Client(base_url=base_url, trust_env=False, timeout=2) as client:
            while True:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"server at {base_url} did not become ready (phase "
                                       f"{app.state.service.phase}, error {app.state.service.error})")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/health/ready").status_code == 200:
                        break
                time.sleep(0.05)
        yield base_url, server
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
