"""The real service on loopback: the FastAPI app (`service.app.create_app`) under uvicorn in a thread of
this process (`service.server.background_server`), serving the EAS directory as variant `eas` and the
baseline as `baseline`, exactly as `eas serve` with EAS_MODEL_PATH / EAS_BASELINE_PATH would.

Requests go to `POST /v1/answer` as multipart uploads with the `variant` field. The raw timings use the
very `LoadedModel` objects the service loaded (`served_model`), so both paths run the same weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI

from eas.model.loading import LoadedModel
from eas_tools.bench.report import BurstSummary
from service.app import create_app
from service.server import background_server
from service.settings import Settings

VARIANTS: tuple[str, str] = ("baseline", "eas")
LONG_DEADLINE_MS = 3_600_000  # a benchmark measures slowness; it must never turn it into 504s


@dataclass(frozen=True)
class HttpTiming:
    e2e_s: float  # client-side: request sent to response parsed
    server: dict[str, float]  # the response's own timings (queue, preprocess, inference, total)


@dataclass(frozen=True)
class Burst:
    """`count` requests from `clients` concurrent clients."""

    wall_s: float
    latencies_s: list[float]
    batches: float  # batches the server ran for them
    mean_batch_size: float

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s


def bench_settings(baseline: Path, eas: Path, *, device: str, dtype: str, max_batch_size: int,
                   batch_wait_ms: float, max_new_tokens: int) -> Settings:
    """The service's settings for a benchmark: both directories, generous deadlines and queue, no auth,
    no shadow traffic; everything else at the service defaults. Explicit values win over EAS_* variables.

    The models run on the server's own threads, not in model processes (service/runner/process.py, on by
    default on a CPU): the in-process timings and memory figures run the very model objects the service
    serves, and a model process leaves only a weightless placeholder in the server's process."""
    return Settings(model_path=eas, baseline_path=baseline, load_baseline=True, model="bench", device=device,
                    dtype=dtype, max_batch_size=max_batch_size, max_batch_wait_ms=batch_wait_ms,
                    max_queue_size=max(128, 4 * max_batch_size), default_deadline_ms=LONG_DEADLINE_MS,
                    max_deadline_ms=LONG_DEADLINE_MS, max_new_tokens=max(128, max_new_tokens),
                    default_max_new_tokens=min(8, max_new_tokens), api_token=None, admin_token=None,
                    shadow_fraction=0.0, model_process=False)


@contextlib.contextmanager
def serve(settings: Settings, startup_timeout_s: float = 1800.0) -> Iterator[tuple[str, FastAPI]]:
    """Start the service; yields (base URL, app) once both variants are loaded and warm."""
    app = create_app(settings)
    with background_server(app, startup_timeout_s=startup_timeout_s) as (base_url, _server):
        yield base_url, app


def served_model(app: FastAPI, variant: str) -> LoadedModel:
    model = app.state.service.registry.get(variant).runner.model
    if any(p.device.type == "meta" for p in model.model.parameters()):
        raise RuntimeError(f"the served {variant} model has no weights in this process (it runs in a model "
                           "process); serve with model_process=False to time it in-process")
    return model


def batch_stats(app: FastAPI, variant: str) -> tuple[float, float]:
    """(sum, count) of the service's batch-size histogram for a variant: batches run and their sizes."""
    registry = app.state.metrics.registry
    labels = {"model": app.state.service.registry.get(variant).info.model, "variant": variant}
    total = registry.get_sample_value("eas_batch_size_sum", labels) or 0.0
    count = registry.get_sample_value("eas_batch_size_count", labels) or 0.0
    return total, count


def _form(question: str, variant: str, max_new_tokens: int) -> dict[str, str]:
    return {"question": question, "variant": variant, "max_new_tokens": str(max_new_tokens)}


def post_answer(client: httpx.Client, png: bytes, question: str, variant: str, max_new_tokens: int) -> HttpTiming:
    t0 = time.perf_counter()
    response = client.post("/v1/answer", files={"image": ("image.png", png, "image/png")},
                           data=_form(question, variant, max_new_tokens))
    body = response.json()
    elapsed = time.perf_counter() - t0
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/answer ({variant}) answered {response.status_code}: {body}")
    if body.get("variant") != variant:
        raise RuntimeError(f"asked for variant {variant}, served {body.get('variant')}")
    return HttpTiming(e2e_s=elapsed, server=dict(body["timings"]))


async def _burst(base_url: str, pngs: list[bytes], question: str, variant: str, max_new_tokens: int,
                 clients: int) -> tuple[float, list[float]]:
    semaphore = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = [0.0] * len(pngs)
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=None, limits=limits) as client:

        async def one(i: int) -> None:
            async with semaphore:
                t0 = time.perf_counter()
                response = await client.post("/v1/answer", files={"image": ("image.png", pngs[i], "image/png")},
                                             data=_form(question, variant, max_new_tokens))
                latencies[i] = time.perf_counter() - t0
                if response.status_code != 200:
                    raise RuntimeError(f"POST /v1/answer ({variant}) answered {response.status_code}: "
                                       f"{response.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(pngs))))
        return time.perf_counter() - t0, latencies


def burst(app: FastAPI, base_url: str, pngs: list[bytes], question: str, variant: str, max_new_tokens: int,
          clients: int) -> Burst:
    """Send every image in `pngs` (one request each) with at most `clients` in flight; wall time to the last
    answer and the batches the server formed for them."""
    before = batch_stats(app, variant)
    wall, latencies = asyncio.run(_burst(base_url, pngs, question, variant, max_new_tokens, clients))
    after = batch_stats(app, variant)
    batches = after[1] - before[1]
    return Burst(wall_s=wall, latencies_s=latencies, batches=batches,
                 mean_batch_size=(after[0] - before[0]) / batches if batches else 0.0)


def summarize_burst(bursts: list[Burst]) -> BurstSummary:
    return BurstSummary(
        requests=sum(len(b.latencies_s) for b in bursts),
        requests_per_s=statistics.median(b.requests_per_s for b in bursts),
        latency_p50_s=statistics.median(x for b in bursts for x in b.latencies_s),
        mean_batch_size=statistics.fmean(b.mean_batch_size for b in bursts),
    )
