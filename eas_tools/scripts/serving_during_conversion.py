"""Serving latency while a conversion job runs (issue: admin jobs must not disturb serving).

Starts the real server (uvicorn on 127.0.0.1) over a temporary store holding MODEL_DIR, measures
batch-1 `/v1/answer` latency idle, then again while a conversion job trains in its worker process, then
cancels the job. Reports medians, p95 and ratios; asserts nothing.

    python -m eas_tools.scripts.serving_during_conversion [--model-dir DIR] [--requests 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from model_store import ModelStore
from service.app import create_app
from service.server import background_server
from service.settings import Settings

EMBEDDED = Path(__file__).resolve().parents[2] / "model_store" / "embedded" / "easy-vqa-llava"
TOKEN = "bench-admin"


def shape_png(size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((12, 12, size - 12, size - 12), fill=(200, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def shapes_dataset(directory: Path, rows: int = 64) -> Path:
    (directory / "img.png").write_bytes(shape_png())
    lines = [json.dumps({"image": "img.png", "question": "what color is the shape?", "answer": "red"})] * rows
    path = directory / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(client: httpx.Client, n: int) -> list[float]:
    png = shape_png()
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = client.post("/v1/answer", files={"image": ("s.png", png, "image/png")},
                               data={"question": "what color is the shape?"})
        latencies.append(time.perf_counter() - t0)
        response.raise_for_status()
    return latencies


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": 1e3 * statistics.median(ordered), "p95_ms": 1e3 * ordered[int(0.95 * (len(ordered) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=EMBEDDED if EMBEDDED.is_dir() else None)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eas-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.model_dir is None:
            from eas.zoo.llava import build_llava

            model, processor = build_llava()
            args.model_dir = tmp_path / "tiny"
            model.save_pretrained(args.model_dir)
            processor.save_pretrained(args.model_dir)
        store = ModelStore(tmp_path / "store")
        store.import_directory("bench", args.model_dir, kind="baseline", activate=True)
        settings = Settings(model_store=store.root, model="bench", device="cpu", admin_token=TOKEN)
        app = create_app(settings)
        with background_server(app) as (url, _server), httpx.Client(base_url=url, timeout=60) as client:
            measure(client, 5)  # warm
            idle = measure(client, args.requests)
            job = client.post("/admin/convert", headers={"Authorization": f"Bearer {TOKEN}"}, json={
                "model": "bench", "dataset": str(shapes_dataset(tmp_path)), "criterion": "uniform",
                "skip_count": 1, "steps": 100_000, "batch_size": 8, "evaluate_accuracy": False, "val_size": 8,
            }).json()
            deadline = time.monotonic() + 300
            while not client.get(f"/admin/jobs/{job['id']}", headers={"Authorization": f"Bearer {TOKEN}"}
                                 ).json()["stage"].startswith("train"):
                if time.monotonic() > deadline:
                    raise SystemExit("the job never reached training")
                time.sleep(0.2)
            busy = measure(client, args.requests)
            client.delete(f"/admin/jobs/{job['id']}", headers={"Authorization": f"Bearer {TOKEN}"})
    result = {"model_dir": str(args.model_dir), "requests": args.requests, "idle": stats(idle),
              "during_conversion": stats(busy)}
    result["p50_ratio"] = result["during_conversion"]["p50_ms"] / result["idle"]["p50_ms"]
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
