"""Probes through the service's life (loading → ready → failed) and the Prometheus exposition."""

from __future__ import annotations

import asyncio
import re
import threading

import httpx
import pytest

from service.app import create_app
from service.lifecycle import default_loader
from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, running_app

pytestmark = pytest.mark.anyio

Q = "what colour is the circle?"


async def test_ready_only_after_loading_and_warm_up(model_dirs: ModelDirs) -> None:
    release = threading.Event()
    warmed: list[str] = []

    def slow_loader(info, settings):
        release.wait(10)
        model = default_loader(info, settings)
        generate_ids = model.generate_ids

        def counting(batch, max_new_tokens=8):
            warmed.append(info.variant)
            return generate_ids(batch, max_new_tokens)

        model.generate_ids = counting
        return model

    app = create_app(make_settings(model_dirs), loader=slow_loader)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/health/live")).json() == {"status": "alive"}
        loading = await client.get("/health/ready")
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "not_ready"
        refused = await client.post("/v1/answer", **multipart(image_bytes(), Q))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "eas_model_ready 0.0" in (await client.get("/metrics")).text
        release.set()
        await app.state.service.wait_loaded(30)
        assert sorted(warmed) == ["baseline", "eas"]  # one real generation per variant before ready (side by side)
        ready = await client.get("/health")
        assert ready.status_code == 200 and ready.json()["variants"] == ["eas", "baseline"]
        assert "eas_model_ready 1.0" in (await client.get("/metrics")).text


async def test_load_failure_stays_unready(model_dirs: ModelDirs, tmp_path) -> None:
    settings = make_settings(model_dirs, model_path=tmp_path / "missing", baseline_path=None)
    async with running_app(settings) as (app, client):
        assert app.state.service.phase == "failed"
        response = await client.get("/health/ready")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "load_failed"
        assert "missing" in response.json()["error"]["message"]
        assert (await client.get("/health/live")).status_code == 200


async def test_metrics_exposition(model_dirs: ModelDirs) -> None:
    async with running_app(make_settings(model_dirs)) as (_, client):
        for variant in ("eas", "baseline"):
            assert (await client.post("/v1/answer", **multipart(image_bytes(), Q, variant=variant))).status_code == 200
        await client.post("/v1/answer", **multipart(b"not an image", Q))
        await asyncio.gather(*(client.post("/v1/answer", **multipart(image_bytes(), Q)) for _ in range(3)))
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    ours = {n for n in names if n.startswith("eas_")}
    assert all(":" not in n for n in names)
    for expected in ("eas_requests_total", "eas_requests_rejected_total", "eas_request_duration_seconds_bucket",
                     "eas_request_queue_duration_seconds_bucket", "eas_preprocess_duration_seconds_bucket",
                     "eas_inference_duration_seconds_bucket", "eas_batch_size_bucket", "eas_queue_depth",
                     "eas_requests_in_flight", "eas_model_info", "eas_model_ready", "eas_image_bytes_bucket",
                     "eas_event_loop_lag_seconds"):
        assert expected in ours, expected
    assert 'eas_requests_total{code="200",model="tiny-llava",route="/v1/answer",variant="baseline"} 1.0' in text
    assert 'eas_requests_total{code="400",model="tiny-llava",route="/v1/answer",variant="eas"} 1.0' in text
    assert 'eas_requests_rejected_total{reason="invalid_image"} 1.0' in text

    def buckets(metric: str, variant: str) -> list[str]:
        return re.findall(rf'{metric}_bucket{{le="([^"]+)",model="tiny-llava",variant="{variant}"}}', text)

    for metric in ("eas_inference_duration_seconds", "eas_request_queue_duration_seconds",
                   "eas_preprocess_duration_seconds", "eas_batch_size"):
        assert buckets(metric, "eas") == buckets(metric, "baseline") != []
    assert buckets("eas_batch_size", "eas")[:7] == ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0"]
