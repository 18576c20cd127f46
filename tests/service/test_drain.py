"""Graceful drain: readiness and new requests turn 503 at once, admitted work finishes, leftovers get 503
at the shutdown timeout; through the service directly and through a real uvicorn (DrainingServer)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest

from service.app import create_app
from tests.service.conftest import Gate, ModelDirs, image_bytes, make_settings, multipart, running_app, uvicorn_thread

Q = "what colour is the circle?"


@pytest.mark.anyio
async def test_service_drain_finishes_admitted_work(model_dirs: ModelDirs) -> None:
    gate = Gate()
    settings = make_settings(model_dirs, baseline_path=None, max_batch_size=1)
    async with running_app(settings, loader=gate.loader()) as (app, client):
        gate.close()
        service = app.state.service
        batcher = service.registry.get("eas").batcher
        admitted = [asyncio.create_task(client.post("/v1/answer", **multipart(image_bytes(), Q)))
                    for _ in range(3)]
        await asyncio.to_thread(gate.started.wait, 10)
        while batcher.pending < 2:
            await asyncio.sleep(0.005)
        drain = asyncio.create_task(service.drain(10))
        await asyncio.sleep(0.01)
        not_ready = await client.get("/health/ready")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "draining"
        refused = await client.post("/v1/answer", **multipart(image_bytes(), Q))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        gate.open()
        assert [r.status_code for r in await asyncio.gather(*admitted)] == [200, 200, 200]
        await asyncio.wait_for(drain, 10)


def _post(base_url: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/answer", timeout=30, trust_env=False, **multipart(image_bytes(), Q))


def _wait(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_uvicorn_drain_on_signal(model_dirs: ModelDirs) -> None:
    """The SIGTERM path of DrainingServer (request_drain runs the same handler), on real sockets."""
    gate = Gate()
    app = create_app(make_settings(model_dirs, baseline_path=None, max_batch_size=1, shutdown_timeout_s=10),
                     loader=gate.loader())
    with uvicorn_thread(app) as (base_url, server), concurrent.futures.ThreadPoolExecutor(4) as pool:
        gate.close()
        batcher = app.state.service.registry.get("eas").batcher
        in_flight = [pool.submit(_post, base_url) for _ in range(3)]
        _wait(lambda: gate.started.is_set() and batcher.pending == 2)
        server.request_drain()
        _wait(lambda: app.state.service.phase == "draining")
        ready = httpx.get(f"{base_url}/health/ready", trust_env=False, timeout=5)
        assert ready.status_code == 503  # still listening, answering 503 while draining
        late = _post(base_url)
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        gate.open()
        assert [f.result(timeout=20).status_code for f in in_flight] == [200, 200, 200]
        _wait(lambda: server.should_exit)


def test_uvicorn_drain_timeout_fails_leftovers(model_dirs: ModelDirs) -> None:
    gate = Gate()
    app = create_app(make_settings(model_dirs, baseline_path=None, max_batch_size=1, shutdown_timeout_s=0.3),
                     loader=gate.loader())
    try:
        with uvicorn_thread(app) as (base_url, server), concurrent.futures.ThreadPoolExecutor(4) as pool:
            gate.close()
            batcher = app.state.service.registry.get("eas").batcher
            in_flight = [pool.submit(_post, base_url) for _ in range(2)]
            _wait(lambda: gate.started.is_set() and batcher.pending == 1)
            t0 = time.monotonic()
            server.request_drain()
            results = [f.result(timeout=20) for f in in_flight]
            assert time.monotonic() - t0 < 5
            assert [r.status_code for r in results] == [503, 503]
            assert {r.json()["error"]["code"] for r in results} == {"shutdown"}
            _wait(lambda: server.should_exit)
            gate.open()
    finally:
        gate.open()  # let the held worker finish, and wait for it: no torch work running at exit
        app.state.service.registry.get("eas").batcher.join(10)


def test_second_signal_skips_the_drain_wait(model_dirs: ModelDirs) -> None:
    gate = Gate()
    app = create_app(make_settings(model_dirs, baseline_path=None, max_batch_size=1, shutdown_timeout_s=30),
                     loader=gate.loader())
    try:
        with uvicorn_thread(app) as (base_url, server), concurrent.futures.ThreadPoolExecutor(2) as pool:
            gate.close()
            in_flight = pool.submit(_post, base_url)
            _wait(gate.started.is_set)
            t0 = time.monotonic()
            server.request_drain()
            _wait(lambda: app.state.service.phase == "draining")
            server.request_drain()  # impatient operator: don't wait the 30 s
            response = in_flight.result(timeout=10)
            assert response.status_code == 503 and response.json()["error"]["code"] == "shutdown"
            assert time.monotonic() - t0 < 5
            gate.open()
    finally:
        gate.open()
        app.state.service.registry.get("eas").batcher.join(10)
