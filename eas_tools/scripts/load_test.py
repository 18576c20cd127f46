"""Drive an eas-serve instance past saturation and report what happened, as one JSON object.

1. Unloaded: `--baseline-requests` sequential `POST /v1/answer`; their median is the reference latency.
2. Loaded: `--concurrency` clients, each with its own keep-alive connection, in a closed loop for
   `--duration` seconds or `--max-requests` requests, whichever comes first. A client that gets 429/503
   waits what Retry-After says (or a fixed `--backoff-ms`, to keep more pressure on) and sends again.
3. Afterwards: one more request, and the server's resident memory (`process_resident_memory_bytes` from
   /metrics, sampled before, during and `--settle` seconds after the load).

The summary counts answers by status, latency percentiles of admitted (200) requests as milliseconds and
as multiples of the unloaded median, the Retry-After values sent with 429s, answers per second of the
load (a stall shows up as a 0), transport errors, and memory. It measures; it does not judge.

    python -m eas_tools.scripts.load_test --url http://127.0.0.1:8000
    python -m eas_tools.scripts.load_test --url http://eas-serve.example:8080 --concurrency 128 --duration 30 \\
        --token $EAS_API_TOKEN \\
        --image shape.png --json-out runs/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Result:
    status: int  # 0: transport error
    started_s: float  # since the start of the load
    latency_s: float
    retry_after: str | None
    error: str | None
    server_s: float | None = None  # the server's own total for an answered request (timings.total_s)
    queue_s: float | None = None  # of which waiting in the batcher's queue


def default_image() -> bytes:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Body:
    """One multipart request body, encoded once: the load generator should spend its CPU on sending."""

    content: bytes
    content_type: str

    @classmethod
    def encode(cls, image: bytes, question: str) -> Body:
        request = httpx.Request("POST", "http://load/", files={"image": ("image.png", image, "image/png")},
                                data={"question": question})
        return cls(request.read(), request.headers["content-type"])


async def _send(client: httpx.AsyncClient, body: Body, started: float) -> Result:
    t0 = time.perf_counter()
    try:
        response = await client.post("/v1/answer", content=body.content, headers={"content-type": body.content_type})
        await response.aread()
    except httpx.HTTPError as exc:
        return Result(0, t0 - started, time.perf_counter() - t0, None, type(exc).__name__)
    latency = time.perf_counter() - t0
    server_s = queue_s = None
    if response.status_code == 200:
        timings = response.json().get("timings", {})
        server_s, queue_s = timings.get("total_s"), timings.get("queue_s")
    return Result(response.status_code, t0 - started, latency, response.headers.get("retry-after"), None,
                  server_s, queue_s)


def _retry_after(result: Result, default_s: float = 1.0) -> float:
    """What a well-behaved client waits after a refusal: the server's Retry-After (seconds form)."""
    try:
        return max(0.0, float(result.retry_after)) if result.retry_after is not None else default_s
    except ValueError:
        return default_s


_RSS = re.compile(r"^process_resident_memory_bytes (\S+)$", re.MULTILINE)


async def resident_bytes(client: httpx.AsyncClient) -> float | None:
    """The server's RSS from its Prometheus process collector; None where /metrics does not say."""
    try:
        match = _RSS.search((await client.get("/metrics")).text)
    except httpx.HTTPError:
        return None
    return float(match.group(1)) if match else None


async def run(url: str, *, concurrency: int = 64, duration_s: float = 20.0, max_requests: int = 10_000,
              baseline_requests: int = 30, backoff_s: float | None = None, settle_s: float = 2.0,
              timeout_s: float = 60.0,
              image: bytes | None = None, question: str = "what color is the shape?",
              token: str | None = None) -> dict[str, Any]:
    body = Body.encode(image if image is not None else default_image(), question)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def connection() -> httpx.AsyncClient:
        # One client with one keep-alive connection per simulated user. With one shared pool, requests
        # waited seconds inside httpx for a pooled connection under load, which read as server latency.
        return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, trust_env=False,
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))

    async with connection() as client:
        # 1. unloaded reference
        unloaded = []
        for _ in range(baseline_requests):
            result = await _send(client, body, time.perf_counter())
            if result.status != 200:
                raise RuntimeError(f"unloaded request failed: {result}")
            unloaded.append(result.latency_s)
        rss_before = await resident_bytes(client)

        # 2. past saturation. The clients are made before the clock starts: building one costs
        # milliseconds of CPU (an SSL context), which at the start would stall every request in flight.
        users = [connection() for _ in range(concurrency)]
        results: list[Result] = []
        sent = 0
        started = time.perf_counter()
        stop_at = started + duration_s

        async def worker(own: httpx.AsyncClient) -> None:
            nonlocal sent
            async with own:
                while sent < max_requests and time.perf_counter() < stop_at:
                    sent += 1
                    result = await _send(own, body, started)
                    results.append(result)
                    if result.status in (429, 503) or result.status == 0:
                        await asyncio.sleep(backoff_s if backoff_s is not None else _retry_after(result))

        rss_samples: list[float] = []

        async def sample_memory() -> None:
            while time.perf_counter() < stop_at:
                value = await resident_bytes(client)
                if value is not None:
                    rss_samples.append(value)
                await asyncio.sleep(0.5)

        sampler = asyncio.ensure_future(sample_memory())
        await asyncio.gather(*(worker(own) for own in users))
        load_s = time.perf_counter() - started
        sampler.cancel()

        # 3. afterwards
        after = await _send(client, body, started)
        await asyncio.sleep(settle_s)
        rss_after = await resident_bytes(client)

    return summarize(url, results, unloaded, load_s, after, concurrency=concurrency,
                     rss=(rss_before, max(rss_samples, default=None), rss_after))


def summarize(url: str, results: list[Result], unloaded: list[float], load_s: float, after: Result, *,
              concurrency: int, rss: tuple[float | None, float | None, float | None]) -> dict[str, Any]:
    by_status = collections.Counter(r.status for r in results)
    admitted = [r.latency_s for r in results if r.status == 200]
    refused = [r.latency_s for r in results if r.status in (429, 503)]
    unloaded_p50 = statistics.median(unloaded)
    answered_per_second = [0] * max(1, math.ceil(load_s))
    for r in results:
        if r.status == 200:
            answered_per_second[min(int(r.started_s + r.latency_s), len(answered_per_second) - 1)] += 1

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    def ratio(value: float | None) -> float | None:
        return None if value is None else round(value / unloaded_p50, 2)

    p50, p95, p99 = (percentile(admitted, q) for q in (50, 95, 99))
    mib = [None if v is None else round(v / 2**20, 1) for v in rss]
    return {
        "url": url,
        "concurrency": concurrency,
        "load_s": round(load_s, 2),
        "requests": len(results),
        "by_status": {str(k): v for k, v in sorted(by_status.items())},
        "answered_per_s": round(by_status[200] / load_s, 1),
        "sent_per_s": round(len(results) / load_s, 1),
        "unloaded": {"requests": len(unloaded), "p50_ms": ms(unloaded_p50), "p99_ms": ms(percentile(unloaded, 99))},
        "admitted": {"p50_ms": ms(p50), "p95_ms": ms(p95), "p99_ms": ms(p99), "max_ms": ms(max(admitted, default=None)),
                     "p50_x_unloaded": ratio(p50), "p99_x_unloaded": ratio(p99)},
        "admitted_server_side": {
            "p50_ms": ms(percentile([r.server_s for r in results if r.server_s is not None], 50)),
            "p99_ms": ms(percentile([r.server_s for r in results if r.server_s is not None], 99)),
            "queue_p99_ms": ms(percentile([r.queue_s for r in results if r.queue_s is not None], 99))},
        "rejected": {"p50_ms": ms(percentile(refused, 50)), "p99_ms": ms(percentile(refused, 99)),
                     "retry_after": dict(collections.Counter(str(r.retry_after) for r in results
                                                             if r.status in (429, 503)))},
        "errors": dict(collections.Counter(r.error for r in results if r.error)),
        "answered_each_second": answered_per_second,
        "after_load": {"status": after.status, "latency_ms": ms(after.latency_s)},
        "rss_mib": {"before": mib[0], "peak": mib[1], "after": mib[2]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (upper bound)")
    parser.add_argument("--max-requests", type=int, default=10_000, help="requests of load (upper bound)")
    parser.add_argument("--baseline-requests", type=int, default=30)
    parser.add_argument("--backoff-ms", type=float,
                        help="fixed pause after a 429/503 or transport error (default: the server's Retry-After)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before the after-load memory sample")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    parser.add_argument("--image", type=Path, help="image file to send (default: a generated 64x64 PNG)")
    parser.add_argument("--question", default="what color is the shape?")
    parser.add_argument("--token", help="API bearer token")
    parser.add_argument("--json-out", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    summary = asyncio.run(run(
        args.url, concurrency=args.concurrency, duration_s=args.duration, max_requests=args.max_requests,
        baseline_requests=args.baseline_requests, settle_s=args.settle,
        backoff_s=None if args.backoff_ms is None else args.backoff_ms / 1000,
        timeout_s=args.timeout, image=args.image.read_bytes() if args.image else None, question=args.question,
        token=args.token))
    text = json.dumps(summary, indent=1)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
