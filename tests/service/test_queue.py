"""Admission and deadlines with a busy worker: 429 when the queue is full, 504 at the deadline (queued
work never runs), clients that disconnect are dropped from the queue, 500 when inference fails.

A `Gate` holds generation so "the worker is busy" is deterministic rather than timing-dependent."""

from __future__ import annotations

import asyncio

import anyio
import httpx
import pytest

from tests.service.conftest import Gate, ModelDirs, image_bytes, make_settings, multipart, running_app

pytestmark = pytest.mark.anyio

Q = "what colour is the circle?"


async def _wait_until(predicate, timeout_s: float = 10.0) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.fixture
async def gated(model_dirs: ModelDirs):
    gate = Gate()
    settings = make_settings(model_dirs, max_batch_size=1, max_queue_size=1, baseline_path=None)
    async with running_app(settings, loader=gate.loader()) as (app, client):
        gate.batches.clear()  # forget the warm-up
        gate.close()
        try:
            yield gate, app, client
        finally:
            gate.open()


async def _post(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    return await client.post("/v1/answer", headers=headers, **multipart(image_bytes(), Q))


async def test_queue_full_is_429_with_retry_after(gated) -> None:
    gate, app, client = gated
    batcher = app.state.service.registry.get("eas").batcher
    running = asyncio.create_task(_post(client))
    await anyio.to_thread.run_sync(gate.started.wait, 10)
    queued = asyncio.create_task(_post(client))
    await _wait_until(lambda: batcher.pending == 1)
    refused = await _post(client)
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    gate.open()
    assert (await running).status_code == 200
    assert (await queued).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'eas_requests_rejected_total{reason="queue_full"} 1.0' in metrics
    assert 'code="429"' in metrics


async def test_deadline_in_queue_is_504_and_never_runs(gated) -> None:
    gate, app, client = gated
    batcher = app.state.service.registry.get("eas").batcher
    running = asyncio.create_task(_post(client))
    await anyio.to_thread.run_sync(gate.started.wait, 10)
    late = await _post(client, **{"X-Request-Deadline-Ms": "150"})
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "deadline_exceeded"
    assert "queued" in late.json()["error"]["message"]
    assert batcher.pending == 0  # withdrawn, not left for the worker
    gate.open()
    assert (await running).status_code == 200
    assert gate.batches == [1]  # only the first request ever reached the model


async def test_deadline_while_running_is_504(gated) -> None:
    _, _, client = gated
    response = await _post(client, **{"X-Request-Deadline-Ms": "150"})
    assert response.status_code == 504
    assert "running" in response.json()["error"]["message"]


async def test_disconnected_client_is_dropped_from_queue(gated) -> None:
    gate, app, client = gated
    batcher = app.state.service.registry.get("eas").batcher
    running = asyncio.create_task(_post(client))
    await anyio.to_thread.run_sync(gate.started.wait, 10)

    # Drive the app directly over ASGI so the client can "hang up" after its body was read.
    encoded = client.build_request("POST", "http://testserver/v1/answer", **multipart(image_bytes(), Q))
    body = encoded.read()
    hang_up = asyncio.Event()
    sent_body = False

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    statuses: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/answer", "raw_path": b"/v1/answer", "query_string": b"",
             "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 1234),
             "headers": [(k.lower().encode(), v.encode()) for k, v in encoded.headers.items()]}
    abandoned = asyncio.create_task(app(scope, receive, send))
    await _wait_until(lambda: batcher.pending == 1)
    hang_up.set()
    await abandoned
    assert batcher.pending == 0
    assert statuses == [499]
    gate.open()
    assert (await running).status_code == 200
    assert gate.batches == [1]  # the abandoned request never ran
    assert 'reason="client_disconnected"' in (await client.get("/metrics")).text


async def test_inference_failure_is_500_in_shape(model_dirs: ModelDirs) -> None:
    gate = Gate()
    async with running_app(make_settings(model_dirs, baseline_path=None), loader=gate.loader()) as (app, client):
        runner = app.state.service.registry.get("eas").runner

        def explode(*_args: object, **_kwargs: object) -> None:
            raise RuntimeError("CUDA out of memory (simulated)")

        runner.model.generate_ids = explode
        response = await _post(client, **{"X-Request-Id": "boom-1"})
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "inference_failed" and error["request_id"] == "boom-1"
        assert "out of memory" not in response.text
