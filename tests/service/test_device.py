"""The GPU path as far as a CPU machine can cover it: `auto` picks CUDA and bf16 when a GPU is visible, and
the half-precision path serves (bf16 weights, fp32 pixels cast on the way in) with answers equal to a
direct bf16 call."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from eas.model.loading import load_model, resolve_device, resolve_dtype
from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, running_app


def test_auto_picks_cuda_and_bf16_when_a_gpu_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert resolve_dtype("auto", device) is torch.bfloat16
    assert resolve_dtype("fp16", device) is torch.float16  # an explicit choice wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = resolve_device("auto")
    assert device.type == "cpu" and resolve_dtype("auto", device) is torch.float32
    assert resolve_device("cuda").type == "cuda"  # explicit: no silent fallback here


@pytest.mark.anyio
async def test_bf16_serving_path(model_dirs: ModelDirs) -> None:
    png = image_bytes()
    question = "what colour is the circle?"
    direct = load_model(model_dirs.eas, device="cpu", dtype="bf16")
    assert next(direct.model.parameters()).dtype is torch.bfloat16
    expected = direct.answer([Image.open(io.BytesIO(png))], [question])[0]
    async with running_app(make_settings(model_dirs, dtype="bf16", load_baseline=False)) as (app, client):
        response = await client.post("/v1/answer", **multipart(png, question))
        assert response.status_code == 200, response.text
        assert response.json()["answer"] == expected
        runner_model = app.state.service.registry.get(None).runner.model.model
        assert next(runner_model.parameters()).dtype is torch.bfloat16
