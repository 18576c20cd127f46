"""uvicorn with the drain order of serving-conventions §5.

Plain uvicorn closes its listening socket on SIGTERM and only then runs the lifespan shutdown, so clients
see refused connections rather than 503s, and readiness never turns 503 while work is still in flight.
`DrainingServer` inserts the drain first: on the first SIGTERM/SIGINT readiness and new requests turn 503
at once, queued and running requests finish (up to `shutdown_timeout_s`), leftovers get 503, and only then
does uvicorn's own shutdown start. A second signal skips the wait (uvicorn's usual behaviour).

Connection limits (issue 17, H3; docs/hardening.md), all from `Settings`, through `uvicorn_config`:
- the request line and headers may take `max_header_bytes` (431 past it, counted before the parser buffers
  them) and must arrive within `header_timeout_s` of the connection or of the request's first byte (408);
- a request body may pause at most `body_timeout_s` between two reads (408, connection closed);
- an idle keep-alive connection closes after `keep_alive_timeout_s` (uvicorn's own timer);
- past `max_connections` open connections (and running requests) uvicorn answers 503 at once.
uvicorn's httptools protocol has no header limit and no read timeouts of its own, so `GuardedHttpTools`
adds them around its parser callbacks.

`GuardedHttpTools` also sends a response's status line and headers in one write with its body
(`OneWriteResponse`, issue 18): uvicorn writes them apart, and each write wakes the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from types import FrameType

import httpx
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import error_body
from service.lifecycle import Service
from service.penalties import SPENT_CODE, SPENT_MESSAGE, ClientPenalties, retry_after_header
from service.settings import Settings

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


_HEADER_END = b"\r\n\r\n"


def _error_bytes(status: int, reason: str, code: str, message: str, retry_after: float | None = None) -> bytes:
    """A complete HTTP/1.1 response in the service's error shape (service/errors.py), closing the connection."""
    kind = "rate_limit_error" if status == 429 else "invalid_request_error"
    body = json.dumps(error_body(code=code, message=message, type_=kind, request_id=None)).encode()
    extra = f"retry-after: {retry_after_header(retry_after)}\r\n" if retry_after is not None else ""
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode("ascii") + body


# A held status line and headers are joined with body bytes up to this size; a larger body follows them in a
# write of its own rather than being copied (its transfer dwarfs one wake-up of the client).
JOIN_LIMIT = 1 << 16
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class OneWriteResponse:
    """One response cycle's view of its connection's transport: the status line and headers are held back and
    leave with the first body bytes, in one write.

    Why (issue 18, docs/serving.md "Peers"): uvicorn writes the head and the body in two writes, and each
    wakes the client. On a machine whose scheduler runs the woken client on the server's own CPU (a packed
    2-vCPU VM here), the server then waited for the client to read the head before it could write the
    body: 0.24 ms of a one-client request, against 0.03 ms for the one write.

    A body that does not follow within the same event-loop turn (a stream's first chunk, a HEAD request,
    a 204) does not hold the head back: it leaves on the loop's next turn, so a streamed response's head
    is sent as soon as it would have been. `100 Continue`, which the client waits for before it sends its
    body, is never held."""

    __slots__ = ("_held", "_loop", "_started", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._started = False  # the head has been seen: every later write passes straight through

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if len(data) <= JOIN_LIMIT:
                self._transport.write(held + data)
                return
            self._transport.write(held)
        elif not self._started and data != _CONTINUE:
            self._started = True
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Write a held head now (the loop's next turn, or before the connection closes)."""
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> object:  # everything else is the connection's own transport
        return getattr(self._transport, name)


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header-size limit and header/body read timeouts, whose
    refusals count against the peer's error budget (service/penalties.py); a peer past its budget is not
    read at all: its connection waits the penalty delay and gets 429."""

    settings: Settings  # set on the subclass `guarded_protocol` makes
    penalties: ClientPenalties | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._awaiting_headers = True
        self._header_bytes = 0
        self._tail = b""  # the last bytes seen, so a header end split across two reads is still found
        self._timer: asyncio.TimerHandle | None = None
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) and peer else None
        wait = self.penalties.retry_after(self._peer) if self.penalties is not None else None
        self._spent = wait is not None
        if wait is not None:
            transport.pause_reading()  # nothing it sends is parsed or buffered here (see data_received)
            self._arm(self.penalties.delay_s, lambda: self._refuse(  # type: ignore[union-attr]
                429, "Too Many Requests", SPENT_CODE, SPENT_MESSAGE, retry_after=wait, charge=False))
            return
        self._arm(self.settings.header_timeout_s, self._header_timeout)  # a connection that sends nothing

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._spent:
            return  # bytes that arrived with the connection, before reading paused: dropped unparsed
        if self._awaiting_headers:
            if self._timer is None:  # first byte of a request on a kept-alive connection
                self._arm(self.settings.header_timeout_s, self._header_timeout)
            window = self._tail + data
            end = window.find(_HEADER_END)
            used = self._header_bytes + (len(data) if end < 0 else end + len(_HEADER_END) - len(self._tail))
            if used > self.settings.max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large", "headers_too_large",
                             f"the request line and headers exceed {self.settings.max_header_bytes} bytes")
                return
            if end < 0:
                self._header_bytes += len(data)
                self._tail = window[-(len(_HEADER_END) - 1):]
        elif self.cycle is not None and self.cycle.more_body:
            self._arm(self.settings.body_timeout_s, self._body_timeout)  # the body is still coming
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._awaiting_headers, self._header_bytes, self._tail = False, 0, b""
        self._arm(self.settings.body_timeout_s, self._body_timeout)
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not previous:  # a new request (not an upgrade): its own view
            cycle.transport = OneWriteResponse(cycle.transport, self.loop)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._awaiting_headers = True  # the next request's headers; the keep-alive timer covers the idle time
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes it cannot parse as HTTP (or an upgrade it does not serve): in the service's
        error shape, and charged to the peer's error budget like the refusals above (it was plain text and
        free, so garbage could be sent in a loop at no cost)."""
        self._refuse(400, "Bad Request", "malformed_http", f"the request is not valid HTTP/1.1: {msg}")

    def _arm(self, delay_s: float, callback: object) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay_s, callback)  # type: ignore[arg-type]

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()  # type: ignore[union-attr]
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self._awaiting_headers:
            self._refuse(408, "Request Timeout", "header_timeout",
                         f"the request headers did not arrive within {self.settings.header_timeout_s:g} s")

    def _body_timeout(self) -> None:
        self._timer = None
        if self.cycle is not None and self.cycle.more_body and not self.cycle.response_started:
            self._refuse(408, "Request Timeout", "body_timeout",
                         f"the request body paused for more than {self.settings.body_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, code: str, message: str, *, retry_after: float | None = None,
                charge: bool = True) -> None:
        self._disarm()
        if charge and self.penalties is not None:
            self.penalties.charge(self._peer)
        if not self.transport.is_closing():
            self.transport.write(_error_bytes(status, reason, code, message, retry_after))
            self.transport.close()
        if self.cycle is not None:  # a request already handed to the app sees its client gone
            self.cycle.disconnected = True
            self.cycle.message_event.set()


def guarded_protocol(settings: Settings, penalties: ClientPenalties | None = None) -> type[GuardedHttpTools]:
    return type("GuardedHttpToolsProtocol", (GuardedHttpTools,), {"settings": settings, "penalties": penalties})


def uvicorn_config(app: FastAPI, settings: Settings, **kwargs: object) -> uvicorn.Config:
    """The uvicorn configuration every way of serving uses: the connection limits come from `settings`."""
    penalties = getattr(app.state, "penalties", None)
    return uvicorn.Config(app, http=guarded_protocol(settings, penalties),  # type: ignore[arg-type]
                          timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
                          limit_concurrency=settings.max_connections, **kwargs)  # type: ignore[arg-type]


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
    config = uvicorn_config(app, app.state.settings, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
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
