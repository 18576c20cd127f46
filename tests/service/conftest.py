"""Fixtures for the service tests: two tiny, differently seeded LLaVA models on disk (built once per
session, loaded in well under a second), settings pointing at them, and a running app behind an ASGI
client (no sockets) with its lifespan entered and its models warm."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw
from transformers.utils import logging as hf_logging

from eas.manifest import write_manifest
from eas.model.loading import LoadedModel
from eas.zoo.llava import build_llava
from eas_tools.bench.skips import bench_plan
from eas_tools.bench.variants import convert_and_save
from service.app import create_app
from service.lifecycle import default_loader
from service.runner.runner import VariantInfo
from service.server import DrainingServer, background_server
from service.settings import Settings

hf_logging.disable_progress_bar()  # keep test output readable

# Where the served models and the tests' own reference copies run: the CPU in fp32 by default (CI);
# `EAS_TEST_DEVICE=cuda EAS_TEST_DTYPE=bf16` runs the service tests on a GPU in bf16 (docs/serving.md, "On a GPU").
TEST_DEVICE = os.environ.get("EAS_TEST_DEVICE", "cpu")
TEST_DTYPE = os.environ.get("EAS_TEST_DTYPE", "fp32")


@dataclass(frozen=True)
class ModelDirs:
    eas: Path
    baseline: Path


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> ModelDirs:
    """`eas`: a seed-0 tiny LLaVA EAS-converted (layer 3 skipped, folded), as `eas convert` writes it, since
    only a converted directory is served as `eas` (service/runner/resolve.py); `baseline`: a plain seed-1 one."""
    root = tmp_path_factory.mktemp("models")
    model, processor = build_llava(seed=0)
    eas = convert_and_save(model, processor, bench_plan(4, count=1), root / "tiny-eas")
    model, processor = build_llava(seed=1)
    baseline = root / "tiny-baseline"
    model.save_pretrained(baseline)
    processor.save_pretrained(baseline)
    write_manifest(baseline)
    return ModelDirs(eas=eas, baseline=baseline)


def make_settings(dirs: ModelDirs, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"model_path": dirs.eas, "baseline_path": dirs.baseline, "model": "tiny-llava",
                              "device": TEST_DEVICE, "dtype": TEST_DTYPE, "max_batch_wait_ms": 2.0,
                              "api_token": None, "admin_token": None, "shutdown_timeout_s": 5.0}
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_app(settings: Settings, **factory_kwargs: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with its lifespan entered and loading finished, plus an in-process client."""
    app = create_app(settings, **factory_kwargs)
    async with app.router.lifespan_context(app):
        await app.state.service.wait_loaded(timeout_s=60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
            yield app, client


class Gate:
    """Holds every generation until opened: makes "the worker is busy" deterministic in tests."""

    def __init__(self) -> None:
        self.open_event = threading.Event()
        self.open_event.set()  # open during warm-up
        self.started = threading.Event()
        self.batches: list[int] = []

    def close(self) -> None:
        self.started.clear()
        self.open_event.clear()

    def open(self) -> None:
        self.open_event.set()

    def loader(self) -> Callable[[VariantInfo, Settings], LoadedModel]:
        def load(info: VariantInfo, settings: Settings) -> LoadedModel:
            model = default_loader(info, settings)
            generate_ids = model.generate_ids

            def gated(batch: Any, max_new_tokens: int = 8) -> Any:
                self.batches.append(int(batch["input_ids"].shape[0]))
                self.started.set()
                if not self.open_event.wait(20):
                    raise TimeoutError("test gate never opened")
                return generate_ids(batch, max_new_tokens)

            model.generate_ids = gated  # type: ignore[method-assign]
            return model

        return load


def image_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 40),
                fmt: str = "PNG", shape: str = "ellipse") -> bytes:
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (size[0] // 5, size[1] // 5, 4 * size[0] // 5, 4 * size[1] // 5)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=color)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def multipart(image: bytes, question: str, **fields: str) -> dict[str, Any]:
    return {"files": {"image": ("image.png", image, "image/png")}, "data": {"question": question, **fields}}


def uvicorn_thread(app: Any) -> AbstractContextManager[tuple[str, DrainingServer]]:
    """A real uvicorn (DrainingServer) on 127.0.0.1 in a background thread, ready when entered."""
    return background_server(app, startup_timeout_s=60)
