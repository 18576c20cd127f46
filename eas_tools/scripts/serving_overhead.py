"""What the HTTP service costs on top of the model, and what dynamic batching buys.

(a) Serving overhead at batch 1: the same (image, question) answered by the direct in-process
    `LoadedModel.answer` call and by `POST /v1/answer` over loopback HTTP, interleaved (the order
    alternates every iteration so drift and caches hit both equally); medians, their ratio and
    difference, plus the median of the paired per-iteration differences. Measured with the batch
    window at 0 ms (pure HTTP + validation + thread hand-off) and at the configured default (what a
    lone request pays for the chance to be batched).
(b) Throughput: the same requests sent one at a time and by 16 concurrent clients, with the answers
    under concurrency compared with unbatched direct answers.

For (a) the server is a real uvicorn (`DrainingServer`) on 127.0.0.1 in a background thread of this
process, so both sides of each pair run under the same conditions; the direct model is a second
`LoadedModel` of the same directory. For (b) the server is by default its own process
(`uvicorn --factory service.app:create_app`, configured through EAS_* variables, as deployed): in one
process the 16 clients' Python and the server's would share one GIL, and the load generator would be
measured as much as the server (`--throughput-server thread` keeps the old in-process set-up for
comparison). Medians and ratios only: absolute times depend on the machine.

    python -m eas_tools.scripts.serving_overhead                       # embedded default model, else a tiny one
    python -m eas_tools.scripts.serving_overhead --model-dir DIR --requests 200 --json-out runs/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from eas.model.loading import LoadedModel, load_model
from service.app import create_app
from service.server import background_server
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]

EMBEDDED = REPO / "model_store" / "embedded" / "easy-vqa-llava"


@dataclass(frozen=True)
class Sample:
    png: bytes
    question: str

    def image(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.png))
        image.load()
        return image


# --- inputs ------------------------------------------------------------------------------------------


def resolve_model_dir(arg: str | None, workdir: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    if (EMBEDDED / "config.json").is_file():
        return EMBEDDED, "embedded default model"
    from eas.manifest import write_manifest
    from eas.zoo.llava import build_llava

    model, processor = build_llava(seed=0)
    path = workdir / "tiny-llava"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    write_manifest(path)
    return path, "tiny random LLaVA (no embedded model found)"


def load_samples(count: int) -> list[Sample]:
    """easy-vqa test images and questions when the package data is there; synthetic shapes otherwise."""
    try:
        from easy_vqa import get_test_image_paths, get_test_questions

        questions, _answers, image_ids = get_test_questions()
        paths = get_test_image_paths()
        return [Sample(Path(paths[image_ids[i]]).read_bytes(), questions[i]) for i in range(count)]
    except Exception:  # the dataset package is optional for this script
        samples = []
        colours = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (220, 200, 30), (0, 128, 128)]
        for i in range(count):
            image = Image.new("RGB", (64, 64), (255, 255, 255))
            box = (8 + i % 7, 10, 50, 54 - i % 5)
            (ImageDraw.Draw(image).ellipse if i % 2 else ImageDraw.Draw(image).rectangle)(
                box, fill=colours[i % len(colours)])
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            samples.append(Sample(buffer.getvalue(), ["what color is the shape?", "what shape is in the image?",
                                                      "is there a red shape?"][i % 3]))
        return samples


# --- measurements ------------------------------------------------------------------------------------


def post(client: httpx.Client, sample: Sample, max_new_tokens: int) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    response = client.post("/v1/answer", files={"image": ("image.png", sample.png, "image/png")},
                           data={"question": sample.question, "max_new_tokens": str(max_new_tokens)})
    elapsed = time.perf_counter() - t0
    response.raise_for_status()
    return elapsed, response.json()


def measure_overhead(direct: LoadedModel, base_url: str, samples: list[Sample], iterations: int,
                     max_new_tokens: int, warmup: int = 5) -> dict[str, Any]:
    images = [s.image() for s in samples]
    http_s: list[float] = []
    direct_s: list[float] = []
    server: dict[str, list[float]] = {"queue_s": [], "preprocess_s": [], "inference_s": [], "total_s": []}
    with httpx.Client(base_url=base_url, trust_env=False, timeout=120) as client:
        for i in range(warmup + iterations):
            k = i % len(samples)
            sample = samples[k]

            def run_direct(k: int = k, sample: Sample = sample) -> float:
                t0 = time.perf_counter()
                direct.answer([images[k]], [sample.question], max_new_tokens)
                return time.perf_counter() - t0

            if i % 2:  # alternate which goes first
                d = run_direct()
                h, body = post(client, sample, max_new_tokens)
            else:
                h, body = post(client, sample, max_new_tokens)
                d = run_direct()
            if i < warmup:
                continue
            http_s.append(h)
            direct_s.append(d)
            for key in server:
                server[key].append(body["timings"][key])
    med = statistics.median
    return {
        "iterations": iterations,
        "http_p50_ms": med(http_s) * 1e3,
        "direct_p50_ms": med(direct_s) * 1e3,
        "overhead_p50_ms": (med(http_s) - med(direct_s)) * 1e3,
        "paired_overhead_p50_ms": med(h - d for h, d in zip(http_s, direct_s, strict=True)) * 1e3,
        "ratio": med(http_s) / med(direct_s),
        "server_p50_ms": {k: med(v) * 1e3 for k, v in server.items()},
        # Server time outside queue, preprocessing (image decode + processor) and the model: routing,
        # auth, body parsing, validation, hand-offs between the event loop and the batch worker.
        "server_other_p50_ms": med(t - q - p - i for t, q, p, i in zip(
            server["total_s"], server["queue_s"], server["preprocess_s"], server["inference_s"], strict=True)) * 1e3,
        "image_decode_p50_ms": med(_decode_s(s.png) for s in samples) * 1e3,
        "client_minus_server_total_p50_ms": med(
            h - t for h, t in zip(http_s, server["total_s"], strict=True)) * 1e3,
    }


def _decode_s(png: bytes) -> float:
    t0 = time.perf_counter()
    Image.open(io.BytesIO(png)).convert("RGB")
    return time.perf_counter() - t0


async def _run_clients(base_url: str, samples: list[Sample], concurrency: int,
                       max_new_tokens: int) -> tuple[float, list[str]]:
    answers: list[str] = [""] * len(samples)
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=300, limits=limits) as client:

        async def one(i: int) -> None:
            async with semaphore:
                response = await client.post(
                    "/v1/answer", files={"image": ("image.png", samples[i].png, "image/png")},
                    data={"question": samples[i].question, "max_new_tokens": str(max_new_tokens)})
                response.raise_for_status()
                answers[i] = response.json()["answer"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(samples))))
        return time.perf_counter() - t0, answers


def batch_stats(base_url: str) -> tuple[float, float]:
    """(sum, count) of the served variant's batch sizes so far, scraped from the server's GET /metrics (the
    same for a server in this process or in its own). The server serves one directory alone, labelled by
    what it is (`eas` if converted, `baseline` if not: service/runner/resolve.py), so every variant counts."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", trust_env=False, timeout=30).text
    found = {"eas_batch_size_sum": 0.0, "eas_batch_size_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] += sample.value
    return found["eas_batch_size_sum"], found["eas_batch_size_count"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(env: dict[str, str], ready_timeout_s: float = 180.0) -> Iterator[str]:
    """`uvicorn --factory service.app:create_app` on a free loopback port, configured by `env` (EAS_*);
    yields its base URL once /health/ready says so, and stops it (SIGTERM, then kill) afterwards."""
    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/health/ready", trust_env=False, timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout_s:.0f} s")
            time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure_throughput(direct: LoadedModel, base_url: str, samples: list[Sample], concurrency: int,
                       max_new_tokens: int) -> dict[str, Any]:
    expected = [direct.answer([s.image()], [s.question], max_new_tokens)[0] for s in samples]
    asyncio.run(_run_clients(base_url, samples[:concurrency], concurrency, max_new_tokens))  # warm-up
    before = batch_stats(base_url)
    seq_s, seq_answers = asyncio.run(_run_clients(base_url, samples, 1, max_new_tokens))
    middle = batch_stats(base_url)
    conc_s, conc_answers = asyncio.run(_run_clients(base_url, samples, concurrency, max_new_tokens))
    after = batch_stats(base_url)
    n = len(samples)
    mismatches = [i for i in range(n) if conc_answers[i] != expected[i]]
    return {
        "requests": n,
        "concurrency": concurrency,
        "sequential_rps": n / seq_s,
        "concurrent_rps": n / conc_s,
        "speedup": seq_s / conc_s,
        "mean_batch_size_sequential": (middle[0] - before[0]) / max(1.0, middle[1] - before[1]),
        "mean_batch_size_concurrent": (after[0] - middle[0]) / max(1.0, after[1] - middle[1]),
        "sequential_answers_equal_unbatched": sum(a == e for a, e in zip(seq_answers, expected, strict=True)),
        "concurrent_answers_equal_unbatched": n - len(mismatches),
        "mismatch_examples": [{"question": samples[i].question, "batched": conc_answers[i],
                               "unbatched": expected[i]} for i in mismatches[:3]],
    }


# --- driver ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help=f"model directory (default: {EMBEDDED.relative_to(REPO)} if "
                                            "present, else a tiny random LLaVA)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--iterations", type=int, default=100, help="interleaved pairs for (a)")
    parser.add_argument("--requests", type=int, default=96, help="requests per throughput run (b)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=Settings.model_fields["max_batch_wait_ms"].default)
    parser.add_argument("--throughput-server", choices=["process", "thread"], default="process",
                        help="(b) against a separate server process (default) or one in this process")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, source = resolve_model_dir(args.model_dir, Path(tmp))
        samples = load_samples(max(args.requests, 16))
        direct = load_model(model_dir, device=args.device, dtype=args.dtype)
        direct.answer([samples[0].image()], [samples[0].question], args.max_new_tokens)  # warm-up
        report: dict[str, Any] = {"model_dir": str(model_dir), "model_source": source,
                                  "device": str(direct.device), "dtype": str(direct.dtype),
                                  "max_new_tokens": args.max_new_tokens, "overhead": {}}
        limits = {"max_batch_size": 16, "max_queue_size": max(128, 2 * args.concurrency),
                  "max_new_tokens": max(128, args.max_new_tokens), "default_deadline_ms": 600_000,
                  "max_deadline_ms": 600_000}
        for wait_ms in sorted({0.0, args.batch_wait_ms}):
            settings = Settings(model_path=model_dir, load_baseline=False, device=args.device, dtype=args.dtype,
                                max_batch_wait_ms=wait_ms, **limits)
            app = create_app(settings)
            with background_server(app) as (base_url, _server):
                report["overhead"][f"batch_wait_{wait_ms:g}ms"] = measure_overhead(
                    direct, base_url, samples[:16], args.iterations, args.max_new_tokens)
                if wait_ms == args.batch_wait_ms and args.throughput_server == "thread":
                    report["throughput"] = measure_throughput(
                        direct, base_url, samples[: args.requests], args.concurrency, args.max_new_tokens)
        if args.throughput_server == "process":
            env = {f"EAS_{k.upper()}": str(v) for k, v in limits.items()}
            env |= {"EAS_MODEL_PATH": str(model_dir), "EAS_LOAD_BASELINE": "false", "EAS_DEVICE": args.device,
                    "EAS_DTYPE": args.dtype, "EAS_MAX_BATCH_WAIT_MS": str(args.batch_wait_ms)}
            with server_process(env) as base_url:
                report["throughput"] = measure_throughput(
                    direct, base_url, samples[: args.requests], args.concurrency, args.max_new_tokens)
        report["throughput"] |= {"batch_wait_ms": args.batch_wait_ms, "server": args.throughput_server}
    print_report(report)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


def print_report(r: dict[str, Any]) -> None:
    print(f"model: {r['model_dir']} ({r['model_source']}), {r['device']}/{r['dtype']}, "
          f"max_new_tokens={r['max_new_tokens']}")
    print("\n(a) serving overhead at batch 1 (medians)\n")
    print("| batch window | direct | HTTP | HTTP - direct | paired diff | ratio | server queue | server "
          "preprocess | server inference | server other | client - server total |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, o in r["overhead"].items():
        s = o["server_p50_ms"]
        print(f"| {name.removeprefix('batch_wait_')} | {o['direct_p50_ms']:.2f} ms | {o['http_p50_ms']:.2f} ms | "
              f"{o['overhead_p50_ms']:+.2f} ms | {o['paired_overhead_p50_ms']:+.2f} ms | {o['ratio']:.3f} | "
              f"{s['queue_s']:.2f} ms | {s['preprocess_s']:.2f} ms | {s['inference_s']:.2f} ms | "
              f"{o['server_other_p50_ms']:.2f} ms | {o['client_minus_server_total_p50_ms']:.2f} ms |")
    first = next(iter(r["overhead"].values()))
    print(f"\nimage decode alone (part of server preprocess): {first['image_decode_p50_ms']:.2f} ms")
    t = r["throughput"]
    print(f"\n(b) throughput, {t['requests']} requests, batch window {t['batch_wait_ms']:g} ms, server in a "
          f"separate {t['server']}\n")
    print("| clients | requests/s | mean batch size | answers equal to unbatched |")
    print("|---|---|---|---|")
    print(f"| 1 | {t['sequential_rps']:.1f} | {t['mean_batch_size_sequential']:.2f} | "
          f"{t['sequential_answers_equal_unbatched']}/{t['requests']} |")
    print(f"| {t['concurrency']} | {t['concurrent_rps']:.1f} | {t['mean_batch_size_concurrent']:.2f} | "
          f"{t['concurrent_answers_equal_unbatched']}/{t['requests']} |")
    print(f"\nthroughput speedup with {t['concurrency']} clients: {t['speedup']:.2f}x")
    for m in t["mismatch_examples"]:
        print(f"  mismatch: {m}")


if __name__ == "__main__":
    raise SystemExit(main())
