"""Client error budgets (service/penalties.py): a client address that keeps getting refusals is answered
429 unread, after a delay; other addresses and the health probes are untouched."""

from __future__ import annotations

import contextlib
import socket
import time

import httpx
import pytest

from service.app import create_app
from service.penalties import ClientPenalties
from tests.hardening.conftest import assert_error, start_server
from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, running_app

BAD_JSON = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}


def test_bucket_spends_refills_and_forgets() -> None:
    box = ClientPenalties(burst=3, rate_per_s=2.0, delay_s=0.0, max_clients=2)
    for _ in range(3):
        assert box.retry_after("a", now=0.0) is None
        box.charge("a", now=0.0)
    assert box.retry_after("a", now=0.0) == pytest.approx(0.5)  # one token back after 1 / rate
    assert box.retry_after("a", now=0.5) is None
    assert box.retry_after("b", now=0.0) is None  # another address has its own budget
    box.charge(None)  # no address (a unix socket): nothing to key on, nothing charged
    box.charge("b", now=10.0)
    box.charge("c", now=10.0)  # a third client: "a" has refilled long ago and is dropped
    assert "a" not in box._buckets and len(box._buckets) == 2
    assert not ClientPenalties(0, 1.0, 0.0).enabled
    heavy = ClientPenalties(burst=30, rate_per_s=1.0, delay_s=0.0)
    heavy.charge("x", now=0.0, body_bytes=14 * 1024 * 1024)  # a refused 14 MiB body: 1 + 14 tokens
    assert heavy.retry_after("x", now=0.0) is None  # 15 left
    heavy.charge("x", now=0.0, body_bytes=14 * 1024 * 1024)
    assert heavy.retry_after("x", now=0.0) == pytest.approx(1.0)  # spent: one token a second comes back


@pytest.mark.anyio
async def test_a_client_past_its_budget_gets_429_unread_and_others_do_not(model_dirs: ModelDirs) -> None:
    settings = make_settings(model_dirs, client_error_burst=3, client_error_rate_per_s=0.01,
                             client_error_delay_s=0.2, baseline_path=None)
    async with running_app(settings) as (app, _):
        def client(address: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 40000)),
                                     base_url="http://testserver", timeout=30)

        async with client("10.0.0.9") as attacker, client("10.0.0.1") as user:
            for _ in range(3):
                assert (await attacker.post("/v1/answer", **BAD_JSON)).status_code == 400
            started = time.monotonic()
            refused = await attacker.post("/v1/answer", **multipart(image_bytes(), "what colour?"))
            assert time.monotonic() - started >= 0.2  # the delay
            error = assert_error(refused, 429, "too_many_errors")
            assert error["type"] == "rate_limit_error" and error["request_id"]
            assert int(refused.headers["retry-after"]) >= 1 and refused.headers["connection"] == "close"
            assert (await attacker.get("/health/live")).status_code == 200  # probes are never refused
            # Another address: unaffected, answered as usual.
            assert (await user.post("/v1/answer", **multipart(image_bytes(), "what colour?"))).status_code == 200
            metrics = (await user.get("/metrics")).text
            assert 'eas_requests_rejected_total{reason="too_many_errors"} 1.0' in metrics


@pytest.mark.anyio
async def test_without_a_budget_errors_are_answered_as_errors(model_dirs: ModelDirs) -> None:
    """The negative control: the same requests with the budget off keep getting their own answers."""
    app = create_app(make_settings(model_dirs, client_error_burst=0, baseline_path=None))
    assert app.state.penalties is None
    async with running_app(make_settings(model_dirs, client_error_burst=0, baseline_path=None)) as (_, client):
        statuses = [(await client.post("/v1/answer", **BAD_JSON)).status_code for _ in range(6)]
        assert statuses == [400] * 6
        assert (await client.post("/v1/answer", **multipart(image_bytes(), "what colour?"))).status_code == 200


def _raw_request(port: int, source: str, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        with contextlib.suppress(OSError):  # refused mid-send: the answer is still waiting to be read
            sock.sendall(payload)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_connection_refusals_count_and_a_spent_peer_is_not_read(model_dirs: ModelDirs) -> None:
    """431s and unparseable requests from the connection layer are charged to the peer; its next connection
    waits and gets 429 without a byte of it parsed, while another loopback address is served."""
    with start_server(model_dirs, client_error_burst=2, client_error_rate_per_s=0.01, client_error_delay_s=0.2,
                      max_header_bytes=2048, baseline_path=None) as live:
        port = int(live.base_url.rsplit(":", 1)[1])
        huge = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
        assert _raw_request(port, "127.0.0.2", huge).startswith(b"HTTP/1.1 431")
        assert _raw_request(port, "127.0.0.2", b"\x16\x03\x01 not http\r\n\r\n").startswith(b"HTTP/1.1 400")
        started = time.monotonic()
        answer = _raw_request(port, "127.0.0.2", b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 429") and b"retry-after:" in answer.lower()
        assert b"too_many_errors" in answer and time.monotonic() - started >= 0.2
        with live.client() as client:  # 127.0.0.1
            assert client.get("/health/live").status_code == 200
            assert client.post("/v1/answer", **multipart(image_bytes(), "what colour?")).status_code == 200
