"""Every `eas_` metric the dashboard, the rules and the autoscaler's adapter query is one the service
exports: after a little traffic (both variants, an error, shadow traffic, a conversion job failed at
start-up) the names in GET /metrics, histogram suffixes stripped, cover all of them."""

from __future__ import annotations

import asyncio

import pytest

from model_store import ModelStore
from tests.observability.conftest import samples
from tests.observability.promql import (
    adapter_series_queries,
    base_name,
    dashboard_expressions,
    metric_names,
    rule_expressions,
)
from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, running_app

pytestmark = pytest.mark.anyio

Q = "what colour is the circle?"


@pytest.fixture(scope="module")
async def exported(model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    store = ModelStore(tmp_path_factory.mktemp("names") / "store")
    store.import_directory("tiny", model_dirs.baseline, kind="baseline", activate=True)
    job = store.jobs.create("tiny", "v1", {"criterion": "uniform"})
    store.jobs.update(job.id, status="running")  # left over by "a previous server": failed at start-up
    settings = make_settings(model_dirs, model_store=store.root, admin_token="adm", shadow_fraction=1.0)
    async with running_app(settings) as (app, client):
        for variant in ("eas", "baseline", "eas"):
            assert (await client.post("/v1/answer", **multipart(image_bytes(), Q, variant=variant))).status_code == 200
        assert (await client.post("/v1/answer", **multipart(b"not an image", Q))).status_code == 400
        for _ in range(600):  # the mirrors finish in the background; bounded at 30 s
            if not app.state.shadow.pending:
                break
            await asyncio.sleep(0.05)
        text = (await client.get("/metrics")).text
    return {base_name(name) for name, _, _ in samples(text)}


def test_the_parser_finds_names() -> None:
    assert metric_names(['sum(rate(eas_requests_total{a="b"}[5m])) / eas:x:y + eas_batch_size_bucket']) == {
        "eas_requests_total", "eas_batch_size"}


async def test_dashboard_metrics_are_exported(exported: set[str]) -> None:
    used = metric_names(dashboard_expressions())
    assert len(used) >= 15
    assert used - exported == set()


async def test_rule_metrics_are_exported(exported: set[str]) -> None:
    used = metric_names(rule_expressions())
    assert {"eas_request_duration_seconds", "eas_inference_duration_seconds", "eas_requests_total"} <= used
    assert used - exported == set()


async def test_autoscaler_metrics_are_exported(exported: set[str]) -> None:
    used = metric_names(adapter_series_queries())
    assert "eas_queue_depth" in used
    assert used - exported == set()


async def test_no_exported_name_has_a_colon(exported: set[str]) -> None:
    assert all(":" not in name for name in exported)
    assert {n for n in exported if n.startswith("eas_")} >= {
        "eas_vision_encoder_duration_seconds", "eas_prefill_duration_seconds", "eas_decode_duration_seconds",
        "eas_shadow_agreement_total", "eas_conversion_jobs_total", "eas_conversion_jobs_in_progress"}
