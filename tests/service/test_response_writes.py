"""A response's status line and headers leave in one write with its body (service/server.py,
`OneWriteResponse`; issue 18): uvicorn writes them apart, and each write wakes the client. A streamed
response's head is not held back for its first chunk, and `100 Continue` is never held."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

import service.server as server_module
from service.server import JOIN_LIMIT, OneWriteResponse, uvicorn_config
from service.settings import Settings

STREAM_PAUSE_S = 0.4  # between a streamed response's head and its first chunk


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _view(loop: asyncio.AbstractEventLoop) -> tuple[FakeTransport, OneWriteResponse]:
    raw = FakeTransport()
    return raw, OneWriteResponse(raw, loop)  # type: ignore[arg-type]


def _turns(loop: asyncio.AbstractEventLoop, count: int = 2) -> None:
    for _ in range(count):
        loop.run_until_complete(asyncio.sleep(0))


def test_head_and_body_leave_in_one_write(loop: asyncio.AbstractEventLoop) -> None:
    raw, view = _view(loop)
    view.write(HEAD)
    assert raw.writes == []
    view.write(b"hello")
    assert raw.writes == [HEAD + b"hello"]
    view.write(b" more")  # everything after the head passes straight through
    _turns(loop)
    assert raw.writes == [HEAD + b"hello", b" more"]
    assert view.get_extra_info("peername") == "extra peername"  # the rest is the connection's own


def test_a_head_without_a_body_in_the_same_turn_leaves_on_the_next(loop: asyncio.AbstractEventLoop) -> None:
    raw, view = _view(loop)
    view.write(HEAD)
    assert raw.writes == []
    _turns(loop)
    assert raw.writes == [HEAD]  # a stream's head is not held until its first chunk
    view.write(b"chunk")
    assert raw.writes == [HEAD, b"chunk"]


def test_continue_and_large_bodies_are_not_held_or_copied(loop: asyncio.AbstractEventLoop) -> None:
    raw, view = _view(loop)
    view.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert raw.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]  # the client waits for it before its body
    view.write(HEAD)
    big = b"x" * (JOIN_LIMIT + 1)
    view.write(big)
    assert raw.writes[1:] == [HEAD, big]


def test_close_sends_a_held_head_first(loop: asyncio.AbstractEventLoop) -> None:
    raw, view = _view(loop)
    view.write(HEAD)
    view.close()
    assert raw.writes == [HEAD] and raw.closed
    _turns(loop)
    assert raw.writes == [HEAD]  # not twice


def test_a_connection_closed_meanwhile_gets_nothing(loop: asyncio.AbstractEventLoop) -> None:
    raw, view = _view(loop)
    view.write(HEAD)
    raw.closed = True  # the client went away before the loop's next turn
    _turns(loop)
    assert raw.writes == []


# --- on a real uvicorn, with the served protocol ------------------------------------------------------------

def _app() -> FastAPI:
    app = FastAPI()

    @app.api_route("/json", methods=["GET", "HEAD"])
    async def as_json() -> dict[str, str]:
        return {"answer": "triangle"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> object:
            await asyncio.sleep(STREAM_PAUSE_S)
            yield b"first"
            yield b"second"
        return StreamingResponse(chunks(), media_type="text/plain")

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return app


class _Recorder:
    """The connection's transport, recording every write that reaches it."""

    def __init__(self, transport: object, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


def _plain_recording_protocol(writes: list[bytes]) -> type[HttpToolsProtocol]:
    class Plain(HttpToolsProtocol):
        def connection_made(self, transport: object) -> None:  # type: ignore[override]
            super().connection_made(_Recorder(transport, writes))  # type: ignore[arg-type]
    return Plain


@pytest.fixture
def writes() -> list[bytes]:
    return []


def _serve(config: uvicorn.Config) -> Iterator[tuple[str, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def served(writes: list[bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    """The app under the service's protocol (`uvicorn_config`), recording what reaches each connection."""
    class Recording(OneWriteResponse):
        def __init__(self, transport: object, loop: asyncio.AbstractEventLoop) -> None:
            super().__init__(_Recorder(transport, writes), loop)  # type: ignore[arg-type]

    monkeypatch.setattr(server_module, "OneWriteResponse", Recording)
    yield from _serve(uvicorn_config(_app(), Settings(), log_level="warning", lifespan="off"))


@pytest.fixture
def plain(writes: list[bytes]) -> Iterator[tuple[str, int]]:
    """The same app under uvicorn's own protocol (the negative control)."""
    yield from _serve(uvicorn.Config(_app(), http=_plain_recording_protocol(writes), log_level="warning",
                                     lifespan="off"))


def _exchange(address: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while not received.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        return received


GET_JSON = b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_served_response_is_one_write(served: tuple[str, int], writes: list[bytes]) -> None:
    answer = _exchange(served, GET_JSON)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"answer":"triangle"}')
    assert len(writes) == 1, writes
    assert writes[0] == answer


def test_uvicorn_alone_writes_head_and_body_apart(plain: tuple[str, int], writes: list[bytes]) -> None:
    """The control: without OneWriteResponse the same response takes two writes, so the test above can fail."""
    answer = _exchange(plain, GET_JSON)
    assert answer.endswith(b'{"answer":"triangle"}')
    assert len(writes) == 2 and writes[0].startswith(b"HTTP/1.1 200") and writes[1] == b'{"answer":"triangle"}'


def test_a_streamed_head_arrives_before_its_first_chunk(served: tuple[str, int], writes: list[bytes]) -> None:
    with socket.create_connection(served, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = sock.recv(65536)
        head_after = time.monotonic() - started
        assert head.startswith(b"HTTP/1.1 200") and b"first" not in head
        assert head_after < STREAM_PAUSE_S / 2, head_after
        rest = b""
        while b"0\r\n\r\n" not in rest:
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
    assert b"first" in rest and b"second" in rest
    assert time.monotonic() - started >= STREAM_PAUSE_S


def test_continue_is_sent_before_the_body(served: tuple[str, int], writes: list[bytes]) -> None:
    body = b"x" * 1000
    with socket.create_connection(served, timeout=10) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n"
                     b"Content-Type: application/octet-stream\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")  # not held behind a response to come
        sock.sendall(body)
        answer = b""
        while not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"bytes":1000}')
    assert writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n" and len(writes) == 2


def test_pipelined_requests_and_head_keep_their_order(served: tuple[str, int], writes: list[bytes]) -> None:
    """Two requests sent at once on one connection, then a HEAD: each answer whole, in order, one write each."""
    with socket.create_connection(served, timeout=10) as sock:
        sock.sendall(GET_JSON + b"GET /json?second=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while received.count(b'{"answer":"triangle"}') < 2:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        sock.sendall(b"HEAD /json HTTP/1.1\r\nHost: x\r\n\r\n")
        head = sock.recv(65536)
    first, second = received.split(b"HTTP/1.1 200 OK")[1:]
    assert first.endswith(b'{"answer":"triangle"}') and second.endswith(b'{"answer":"triangle"}')
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")  # a head and no body
    assert len(writes) == 3 and b"".join(writes[:2]) == received and writes[2] == head
