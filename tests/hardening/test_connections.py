"""Issue 17, H3: connection limits from Settings on a real server (service/server.py GuardedHttpTools):
oversized headers get 431 without being buffered, headers and bodies that trickle get 408 and the
connection closes, and normal keep-alive traffic is untouched."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.hardening.conftest import LiveServer, start_server
from tests.service.conftest import ModelDirs


@pytest.fixture(scope="module")
def guarded(model_dirs: ModelDirs) -> Iterator[LiveServer]:
    with start_server(model_dirs, baseline_path=None, max_header_bytes=4096, header_timeout_s=0.5,
                      body_timeout_s=0.5, keep_alive_timeout_s=1) as live:
        yield live


def _connect(live: LiveServer) -> socket.socket:
    url = urlsplit(live.base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=5)
    return sock


def _read_all(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def test_oversized_headers_get_431(guarded: LiveServer) -> None:
    sock = _connect(guarded)
    try:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)
        answer = _read_all(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"headers_too_large" in answer


def test_bytes_that_are_not_http_get_the_error_shape(guarded: LiveServer) -> None:
    sock = _connect(guarded)
    try:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)  # a TLS hello on plain HTTP
        answer = _read_all(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "malformed_http"  # was uvicorn's plain-text line


def test_health_answers_head(guarded: LiveServer) -> None:
    with guarded.client() as client:
        for path in ("/health/live", "/health/ready", "/health"):
            response = client.head(path)
            assert response.status_code == 200 and response.content == b"", path


def test_trickled_headers_and_bodies_get_408_and_close(guarded: LiveServer) -> None:
    header = _connect(guarded)
    body = _connect(guarded)
    silent = _connect(guarded)
    try:
        header.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")  # ... and never the end of its headers
        body.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"question\": ")  # ... and never the rest of its body
        started = time.monotonic()
        answers = [_read_all(s) for s in (header, body, silent)]
        elapsed = time.monotonic() - started
    finally:
        for s in (header, body, silent):
            s.close()
    assert answers[0].startswith(b"HTTP/1.1 408") and b"header_timeout" in answers[0], answers[0][:200]
    assert answers[1].startswith(b"HTTP/1.1 408") and b"body_timeout" in answers[1], answers[1][:200]
    assert answers[2].startswith(b"HTTP/1.1 408"), answers[2][:200]  # connected, sent nothing
    assert elapsed < 4.5  # closed by the server, not by our read timeouts


def test_normal_keep_alive_requests_are_untouched(guarded: LiveServer) -> None:
    with guarded.client() as client:
        for _ in range(3):
            assert client.get("/health/live").status_code == 200
        time.sleep(0.8)  # longer than the header timeout while idle: the keep-alive timer rules here
        assert client.get("/health/live").status_code == 200
