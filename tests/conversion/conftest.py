"""Fixtures for conversion tests: a tiny LLaVA in a store, a small JSONL dataset of drawn shapes.

Everything is tiny (a 4-layer, 268k-parameter LLaVA; a few dozen 32-px images) so each test takes
seconds; the conversion settings below are the smallest that still exercise every stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "yellow": (230, 220, 40)}
SHAPES = ("circle", "rectangle")


def draw(colour: str, shape: str, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    box = (6, 6, size - 6, size - 6)
    (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=COLOURS[colour])
    return image


def write_shapes_dataset(directory: Path, repeats: int = 3) -> Path:
    """JSONL rows with images in `images/` (paths relative to the file): colour and shape questions."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"images/{colour}-{shape}.png"
            draw(colour, shape).save(directory / name)
            for _ in range(repeats):
                lines.append({"image": name, "question": "what color is the shape?", "answer": colour})
                lines.append({"image": name, "question": "what shape is in the image?", "answer": shape})
    path = directory / "shapes.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine run ~10x faster on one thread (no OpenMP barrier waits
    behind other processes); restored afterwards for the rest of the session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# tiny_model_dir, tiny_store and shapes_jsonl come from tests/conftest.py.


def fast_request(**overrides):
    """The smallest conversion that runs every stage (a few steps each, short evaluation)."""
    from eas.conversion.pipeline import ConversionRequest

    settings = dict(
        model="tiny", criterion="cosine", skip_count=2, steps=6, batch_size=8, val_size=8,
        calibration_samples=8, eval_limit=8, latency_runs=1, latency_prompts=1, latency_new_tokens=2,
        search={"steps": 8, "n_turn": 2, "warmup_fraction": 0.25, "reward_batch_size": 4},
        show_progress_bar=False, device="cpu",
    )
    settings.update(overrides)
    return ConversionRequest(**settings)
