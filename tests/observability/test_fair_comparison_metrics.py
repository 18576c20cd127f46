"""The metrics behind a fair eas-vs-baseline comparison (docs/observability.md, "What the speedup compares"):
per-batch model time by batch-size class and traffic, mirrored batches kept out of the live series, the
real image size, and the default variant listed first by `GET /v1/models` and `/info`."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import random
import re

import pytest
from PIL import Image

from service.batching.work import Generation, WorkItem
from service.metrics import IMAGE_BYTES_BUCKETS, REQUEST_BUCKETS, Metrics, batch_size_class
from tests.observability.conftest import value
from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, running_app

Q = "what colour is the circle?"


def bucket_counts(text: str, metric: str, **labels: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of one histogram series, in exposition order."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    out = []
    for match in re.finditer(rf"^{metric}_bucket\{{([^}}]*)\}} (\S+)$", text, re.M):
        if all(w in match[1] for w in wanted):
            le = re.search(r'le="([^"]+)"', match[1])
            assert le is not None
            out.append((float(le[1]), float(match[2])))
    return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets: linear within the bucket holding rank q."""
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    raise AssertionError("rank beyond the last bucket")


def test_batch_size_classes_are_exact_where_batches_are_common_and_few_overall() -> None:
    assert [batch_size_class(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 256)] == [
        "1", "2", "3", "4", "5-8", "5-8", "9-16", "9-16", "17-32", "33-64", "65-128", "129-256"]
    assert len({batch_size_class(n) for n in range(1, 257)}) == 10  # EAS_MAX_BATCH_SIZE <= 256


def fake_batch(rows: int, mirrored: int, seconds: float) -> tuple[list[WorkItem], list[Generation]]:
    loop = asyncio.new_event_loop()
    try:
        items = [WorkItem(image=Image.new("RGB", (2, 2)), question=Q, max_new_tokens=1, deadline=0.0, loop=loop,
                          future=loop.create_future(), shadow=i < mirrored) for i in range(rows)]
    finally:
        loop.close()
    generation = Generation(text="a", prompt_tokens=1, completion_tokens=1, finish_reason="stop", prepare_s=0.0,
                            inference_s=seconds, batch_size=rows)
    return items, [generation] * rows


def test_batch_observer_labels_size_and_traffic_and_keeps_mirrors_out_of_batch_size() -> None:
    metrics = Metrics(process_metrics=False)
    observe = metrics.batch_observer("m", "baseline")
    observe(*fake_batch(1, 0, 0.04))  # live, size 1
    observe(*fake_batch(3, 1, 0.09))  # a mirror rode along: shadow, size 3
    observe(*fake_batch(6, 6, 0.2))  # mirrors only: shadow, size class 5-8
    text = metrics.render().decode()
    series = "eas_batch_inference_duration_seconds"
    assert value(text, f"{series}_count", variant="baseline", batch_size="1", traffic="live") == 1
    assert value(text, f"{series}_sum", variant="baseline", batch_size="1", traffic="live") == pytest.approx(0.04)
    assert value(text, f"{series}_count", variant="baseline", batch_size="3", traffic="shadow") == 1
    assert value(text, f"{series}_count", variant="baseline", batch_size="5-8", traffic="shadow") == 1
    assert value(text, f"{series}_count", traffic="live") == 1  # one observation per batch, not per row
    # The live batch-size figure counts the live batch only (before: 3 batches, mean 3.33).
    assert value(text, "eas_batch_size_count", variant="baseline") == 1
    assert value(text, "eas_batch_size_sum", variant="baseline") == 1


def test_per_batch_histograms_share_buckets_across_variants() -> None:
    metrics = Metrics(process_metrics=False)
    for variant in ("eas", "baseline"):
        metrics.batch_observer("m", variant)(*fake_batch(2, 0, 0.05))
    text = metrics.render().decode()
    eas = [b for b, _ in bucket_counts(text, "eas_batch_inference_duration_seconds", variant="eas")]
    baseline = [b for b, _ in bucket_counts(text, "eas_batch_inference_duration_seconds", variant="baseline")]
    assert eas == baseline == [*REQUEST_BUCKETS, float("inf")]


@pytest.mark.anyio
async def test_mirrored_batches_are_labelled_shadow_in_a_running_service(model_dirs: ModelDirs) -> None:
    """Only eas requests, each mirrored (fraction 1.0), one request per batch: every baseline batch is a
    mirror's, so the baseline has no live batch and an empty live batch-size histogram."""
    settings = make_settings(model_dirs, shadow_fraction=1.0, shadow_max_queue_depth=8, max_batch_size=1)
    async with running_app(settings) as (app, client):
        for _ in range(3):
            response = await client.post("/v1/answer", **multipart(image_bytes(), Q, variant="eas",
                                                                    max_new_tokens="2"))
            assert response.status_code == 200
        # The mirrors finish in the background, and the last one is only scheduled (call_soon) after its
        # request's response: "nothing pending" can be seen before it starts, so wait for all three to be
        # counted and for none to be pending (bounded at 30 s).
        for _ in range(600):
            text = (await client.get("/metrics")).text
            if not app.state.shadow.pending and value(text, "eas_shadow_requests_total", outcome="completed") >= 3:
                break
            await asyncio.sleep(0.05)
    series = "eas_batch_inference_duration_seconds_count"
    assert value(text, "eas_shadow_requests_total", outcome="completed") == 3
    assert value(text, series, variant="eas", batch_size="1", traffic="live") == 3
    assert value(text, series, variant="baseline", traffic="shadow") == 3
    assert value(text, series, variant="baseline", traffic="live") == 0
    assert value(text, "eas_batch_size_count", variant="eas") == 3
    assert value(text, "eas_batch_size_count", variant="baseline") == 0  # mirrors are not baseline traffic


@pytest.mark.anyio
async def test_image_size_records_the_real_uploaded_size(model_dirs: ModelDirs) -> None:
    small = image_bytes()  # a few hundred bytes
    noise = Image.frombytes("RGB", (300, 200), random.Random(0).randbytes(300 * 200 * 3))  # PNG can't shrink it
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    large = buffer.getvalue()  # about 180 KB
    assert len(small) < 1024 < 64 * 1024 < len(large)
    async with running_app(make_settings(model_dirs)) as (_, client):
        for _ in range(3):
            assert (await client.post("/v1/answer", **multipart(small, Q, variant="eas"))).status_code == 200
        # JSON with base64: the decoded size counts, not the base64 text.
        payload = {"image": base64.b64encode(large).decode(), "question": Q, "variant": "baseline"}
        assert (await client.post("/v1/answer", json=payload)).status_code == 200
        text = (await client.get("/metrics")).text
    assert value(text, "eas_image_bytes_sum", variant="eas") == 3 * len(small)
    assert value(text, "eas_image_bytes_sum", variant="baseline") == len(large)
    for variant, size in (("eas", len(small)), ("baseline", len(large))):
        buckets = bucket_counts(text, "eas_image_bytes", variant=variant)
        assert [b for b, _ in buckets] == [*IMAGE_BYTES_BUCKETS, float("inf")]
        # The bucket holding the size is at most twice it, so the dashboard's p50 lands near the real size
        # (with buckets from 16 KiB, any small image read 8192 B).
        first = next(bound for bound, count in buckets if count > 0)
        assert size <= first <= 2 * size, (variant, size, first)
        assert size / 2 <= quantile(0.5, buckets) <= 2 * size, (variant, size, quantile(0.5, buckets))


@pytest.mark.anyio
async def test_models_and_info_list_the_default_variant_first(model_dirs: ModelDirs) -> None:
    async with running_app(make_settings(model_dirs)) as (app, client):
        registry = app.state.service.registry
        # As after a hot activation of a converted model on a server that started with its baseline:
        # `baseline` installed first, `eas` installed later as the default.
        eas = registry.remove("eas")
        assert eas is not None
        registry.install(eas, default=True)
        assert [s.variant for s in registry.all()] == ["baseline", "eas"]
        for default in ("eas", "baseline", "eas"):
            registry.set_default(default)
            models = (await client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == [default, *({"eas", "baseline"} - {default})]
            assert [m["default"] for m in models] == [True, False]
            info = (await client.get("/info")).json()
            assert info["default_variant"] == default
            assert [v["variant"] for v in info["variants"]] == [m["id"] for m in models]


def test_image_bucket_bounds() -> None:
    """Powers of two from 256 B to the 64 MiB that covers any EAS_MAX_BODY_BYTES in practice."""
    assert IMAGE_BYTES_BUCKETS[0] == 256 and IMAGE_BYTES_BUCKETS[-1] == 64 * 1024 * 1024
    assert all(b == 2 * a for a, b in itertools.pairwise(IMAGE_BYTES_BUCKETS))
