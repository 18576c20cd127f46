"""Shadow mode: a sampled fraction of `eas` requests is mirrored to `baseline` off the response path.

The baseline is held by a gate while eas requests are answered, so a mirror that delayed the response
would show as a timeout here; the answers must equal those of a server without shadow mode. Once the gate
opens the mirrored requests complete and the shadow counters move.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from eas.model.loading import LoadedModel
from service.lifecycle import default_loader
from service.runner.runner import VariantInfo
from service.settings import Settings
from service.shadow import same_answer
from tests.observability.conftest import value
from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, running_app

pytestmark = pytest.mark.anyio

Q = "what colour is the circle?"
COLORS = [(200, 30, 30), (30, 160, 40), (40, 40, 200)]


class BaselineGate:
    """Holds the baseline's generations (after its warm-up) until opened; eas runs freely."""

    def __init__(self) -> None:
        self.open_event = threading.Event()
        self.open_event.set()
        self.baseline_started = threading.Event()
        self.calls = 0  # baseline generations since the gate was first closed
        self.counting = False

    def close(self) -> None:
        self.counting = True
        self.open_event.clear()

    def loader(self, info: VariantInfo, settings: Settings) -> LoadedModel:
        model = default_loader(info, settings)
        if info.variant != "baseline":
            return model
        generate_ids = model.generate_ids

        def gated(batch: Any, max_new_tokens: int = 8) -> Any:
            self.calls += self.counting
            self.baseline_started.set()
            if not self.open_event.wait(30):
                raise TimeoutError("test gate never opened")
            return generate_ids(batch, max_new_tokens)

        model.generate_ids = gated  # type: ignore[method-assign]
        return model


async def answers_without_shadow(model_dirs: ModelDirs) -> list[str]:
    async with running_app(make_settings(model_dirs)) as (_, client):
        return [(await client.post("/v1/answer", **multipart(image_bytes(c), Q))).json()["answer"] for c in COLORS]


async def test_mirrored_requests_never_delay_or_change_the_answer(model_dirs: ModelDirs) -> None:
    expected = await answers_without_shadow(model_dirs)
    gate = BaselineGate()
    # The baseline is the eas model itself, so every mirrored answer must agree.
    settings = make_settings(model_dirs, baseline_path=model_dirs.eas, shadow_fraction=1.0,
                             shadow_max_queue_depth=8)
    async with running_app(settings, loader=gate.loader) as (app, client):
        gate.close()
        answers, elapsed = [], []
        for color in COLORS:
            t0 = time.perf_counter()
            response = await client.post("/v1/answer", **multipart(image_bytes(color), Q))
            elapsed.append(time.perf_counter() - t0)
            assert response.status_code == 200
            assert response.json()["variant"] == "eas"
            answers.append(response.json()["answer"])
        # Answered while the baseline is blocked: the mirrors were not on the response path.
        assert answers == expected
        assert max(elapsed) < 10, elapsed
        assert await asyncio.to_thread(gate.baseline_started.wait, 10)  # a mirror did reach the baseline
        shadow = app.state.shadow
        assert shadow.pending == len(COLORS)
        text = (await client.get("/metrics")).text
        assert value(text, "eas_shadow_agreement_total") == 0
        # Shadows are not client requests: nothing counted for the baseline route.
        assert value(text, "eas_requests_total", variant="baseline") == 0

        gate.open_event.set()
        deadline = time.monotonic() + 30
        while shadow.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        text = (await client.get("/metrics")).text
    assert value(text, "eas_shadow_requests_total", outcome="completed") == len(COLORS)
    assert value(text, "eas_shadow_agreement_total", result="match") == len(COLORS)
    assert value(text, "eas_shadow_agreement_total", result="mismatch") == 0
    assert value(text, "eas_shadow_inference_duration_seconds_count", variant="baseline") == len(COLORS)
    assert value(text, "eas_inference_duration_seconds_count", variant="baseline") == 0  # live only
    assert value(text, "eas_requests_total", variant="eas", code="200") == len(COLORS)


async def test_mirroring_is_suspended_above_the_queue_threshold(model_dirs: ModelDirs) -> None:
    gate = BaselineGate()
    settings = make_settings(model_dirs, shadow_fraction=1.0, shadow_max_queue_depth=1, max_batch_size=1)
    async with running_app(settings, loader=gate.loader) as (app, client):
        gate.close()
        assert (await client.post("/v1/answer", **multipart(image_bytes(), Q))).status_code == 200
        assert await asyncio.to_thread(gate.baseline_started.wait, 10)  # the first mirror is running
        for color in COLORS + COLORS[:2]:
            assert (await client.post("/v1/answer", **multipart(image_bytes(color), Q))).status_code == 200
        await asyncio.sleep(0.1)  # let the last call_soon mirrors run
        # One mirror runs (blocked), one waits in the queue; the rest found the queue at the threshold.
        text = (await client.get("/metrics")).text
        assert value(text, "eas_shadow_requests_total", outcome="suspended") == 4
        assert app.state.shadow.pending == 2
        gate.open_event.set()
        deadline = time.monotonic() + 30
        while app.state.shadow.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        text = (await client.get("/metrics")).text
    assert value(text, "eas_shadow_requests_total", outcome="completed") == 2
    # Different random models: whatever they answer is counted as exactly one of match/mismatch.
    assert value(text, "eas_shadow_agreement_total") == 2


async def test_baseline_requests_and_fraction_zero_are_never_mirrored(model_dirs: ModelDirs) -> None:
    async with running_app(make_settings(model_dirs, shadow_fraction=1.0)) as (app, client):
        await client.post("/v1/answer", **multipart(image_bytes(), Q, variant="baseline"))
        await asyncio.sleep(0.05)
        assert app.state.shadow.pending == 0
        assert value((await client.get("/metrics")).text, "eas_shadow_requests_total") == 0
    async with running_app(make_settings(model_dirs)) as (app, _client):
        assert app.state.shadow is None  # off by default: not even constructed


async def test_shutdown_abandons_queued_mirrors(model_dirs: ModelDirs) -> None:
    gate = BaselineGate()
    settings = make_settings(model_dirs, shadow_fraction=1.0)
    async with running_app(settings, loader=gate.loader) as (app, client):
        gate.close()
        await client.post("/v1/answer", **multipart(image_bytes(), Q))
        assert await asyncio.to_thread(gate.baseline_started.wait, 10)  # mirror 1 runs (held)
        await client.post("/v1/answer", **multipart(image_bytes((30, 160, 40)), Q))
        await asyncio.sleep(0.05)  # mirror 2 waits in the baseline queue
        shadow = app.state.shadow
        assert shadow.pending == 2
        # Shutdown closes the mirror first (mirror 2 leaves the queue), then drains the running batch,
        # which needs the gate open: open it shortly after shutdown begins.
        threading.Timer(0.3, gate.open_event.set).start()
    assert shadow.pending == 0
    assert gate.calls == 1  # the queued mirror never ran


def test_answers_compare_up_to_case_and_spacing() -> None:
    assert same_answer(" Red\n", "red")
    assert same_answer("dark  blue", "Dark blue")
    assert not same_answer("red", "blue")
