"""The service's metrics for the eas/baseline comparison: request duration by code, the model-phase split,
model info with skipped layers, queue capacity, token counts, identical buckets for both variants."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from eas.model.loading import load_model
from service.metrics import PHASES, Metrics
from service.runner.phases import PhaseMarks, PhaseTimer, find_vision_modules
from service.runner.runner import ModelRunner, VariantInfo, warmup_image
from tests.observability.conftest import value
from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, running_app

Q = "what colour is the circle?"


class FakeClock:
    """Marks are numbers handed out in order; durations are their differences."""

    def __init__(self, times: list[float]) -> None:
        self.times = iter(times)

    def mark(self) -> float:
        return next(self.times)

    def seconds(self, start: float, end: float) -> float:
        return end - start


def test_phase_math_splits_time_to_first_token_and_decode() -> None:
    marks = PhaseMarks(FakeClock([]))
    marks.points = {"start": 0.0, "vision_start": 0.5, "vision_end": 2.5, "first_forward_end": 6.0, "end": 10.0}
    assert marks.seconds() == {"vision_encoder": 2.0, "prefill": 4.0, "decode": 4.0}
    marks.points = {"start": 0.0, "first_forward_end": 3.0, "end": 4.0}  # a text-only model
    assert marks.seconds() == {"prefill": 3.0, "decode": 1.0}
    marks.points = {"start": 0.0}  # the generation raised: nothing to report
    assert marks.seconds() == {}


def test_phase_hooks_cover_the_whole_generation(model_dirs: ModelDirs) -> None:
    loaded = load_model(model_dirs.eas, device="cpu", dtype="fp32")
    vision, end = find_vision_modules(loaded.model)
    assert vision is loaded.model.model.vision_tower and end is loaded.model.model.multi_modal_projector
    runner = ModelRunner(loaded, VariantInfo("eas", "tiny", "v1", "local", Path(model_dirs.eas)))
    runner.warm_up(8)
    t0 = time.perf_counter()
    generation = runner.generate([warmup_image()] * 2, [Q] * 2, [8, 8])[0]
    wall = time.perf_counter() - t0
    assert set(generation.phases) == set(PHASES)
    assert all(v > 0 for v in generation.phases.values()), generation.phases
    # The phases partition generate_ids; inference_s adds detokenisation; nothing exceeds the wall time.
    total = sum(generation.phases.values())
    assert total <= generation.inference_s <= wall
    assert generation.inference_s - total < 0.05 + 0.2 * generation.inference_s
    assert runner.skipped_layers == (3,)  # model_dirs.eas is converted with layer 3 skipped


def test_phase_hooks_ignore_other_threads_and_unmeasured_calls(model_dirs: ModelDirs) -> None:
    loaded = load_model(model_dirs.eas, device="cpu", dtype="fp32")
    timer = PhaseTimer(loaded.model, "cpu")
    batch = loaded.prepare([warmup_image()], [Q])
    loaded.generate_ids(batch, 2)  # outside measure(): the hooks record nothing and fail nothing
    with timer.measure() as marks:
        loaded.generate_ids(batch, 2)
    assert {"start", "vision_start", "vision_end", "first_forward_end", "end"} <= set(marks.points)
    timer.remove()
    with timer.measure() as marks:
        loaded.generate_ids(batch, 2)
    assert set(marks.points) == {"start", "end"}  # hooks removed: only the brackets


def test_phase_hooks_find_a_second_family() -> None:
    """Qwen2-VL's vision encoder is `visual` (merger inside): the vision phase starts and ends there."""
    from PIL import Image

    from eas.model.generation import generate
    from eas.zoo.qwen2vl import build_qwen2vl, qwen2vl_inputs

    model = build_qwen2vl()
    vision, end = find_vision_modules(model)
    assert vision is model.model.visual and end is vision
    timer = PhaseTimer(model, "cpu")
    with timer.measure() as marks:
        generate(model, qwen2vl_inputs([Image.new("RGB", (32, 32), (200, 30, 30))], [[10, 11, 12]]),
                 max_new_tokens=3)
    assert set(marks.seconds()) == set(PHASES)


@pytest.mark.anyio
async def test_exposition_has_the_comparison_metrics(model_dirs: ModelDirs) -> None:
    async with running_app(make_settings(model_dirs, max_queue_size=7)) as (_, client):
        for variant in ("eas", "baseline", "eas"):
            response = await client.post("/v1/answer", **multipart(image_bytes(), Q, variant=variant,
                                                                    max_new_tokens="3"))
            assert response.status_code == 200
        assert (await client.post("/v1/answer", **multipart(b"not an image", Q))).status_code == 400
        text = (await client.get("/metrics")).text

    assert all(":" not in line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#"))
    route = 'route="/v1/answer"'
    assert value(text, "eas_request_duration_seconds_count", code="200", variant="eas") == 2
    assert value(text, "eas_request_duration_seconds_count", code="200", variant="baseline") == 1
    assert value(text, "eas_request_duration_seconds_count", code="400", variant="eas") == 1
    assert route in text
    for name in ("eas_vision_encoder_duration_seconds", "eas_prefill_duration_seconds",
                 "eas_decode_duration_seconds", "eas_inference_duration_seconds"):
        assert value(text, f"{name}_count", variant="eas") == 2, name
        assert value(text, f"{name}_count", variant="baseline") == 1, name
        assert value(text, f"{name}_sum", variant="eas") > 0, name
    # The split sits inside the model time it splits.
    parts = sum(value(text, f"eas_{p}_duration_seconds_sum", variant="eas")
                for p in ("vision_encoder", "prefill", "decode"))
    assert parts <= value(text, "eas_inference_duration_seconds_sum", variant="eas")
    assert value(text, "eas_generated_tokens_total", variant="eas") > 0
    assert value(text, "eas_queue_capacity", variant="eas") == 7
    assert value(text, "eas_queue_capacity", variant="baseline") == 7
    info = re.findall(r"^eas_model_info\{([^}]*)\} 1\.0$", text, re.M)
    assert len(info) == 2 and all('device="cpu"' in labels for labels in info)
    assert sorted(re.search(r'skipped_layers="([^"]*)"', labels)[1] for labels in info) == ["", "3"]  # baseline, eas

    def buckets(metric: str, variant: str) -> list[str]:
        return re.findall(rf'^{metric}_bucket{{le="([^"]+)",model="tiny-llava",variant="{variant}"}}', text, re.M)

    for metric in ("eas_vision_encoder_duration_seconds", "eas_prefill_duration_seconds",
                   "eas_decode_duration_seconds"):
        assert buckets(metric, "eas") == buckets(metric, "baseline") != [], metric


def test_model_info_names_the_skipped_layers() -> None:
    from eas.model.plan import SkipPlan

    class Loaded:
        plan = SkipPlan(skipped=(5, 1, 3), num_layers=8)
        model = torch.nn.Linear(1, 1)
        device = torch.device("cpu")
        dtype = torch.float32
        processor = None

    runner = ModelRunner(Loaded(), VariantInfo("eas", "m", "v2", "converted", Path(".")))  # type: ignore[arg-type]
    assert runner.skipped_layers == (1, 3, 5)
    Loaded.plan = None  # type: ignore[assignment]
    assert runner.skipped_layers == ()


def test_conversion_job_durations_parse_store_timestamps() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.observe_conversion_job("succeeded", "2026-01-01T10:00:00Z", "2026-01-01T10:05:30Z")
    metrics.observe_conversion_job("cancelled", None, "2026-01-01T10:00:01Z")  # never ran: counted, not timed
    text = metrics.render().decode()
    assert value(text, "eas_conversion_jobs_total", status="succeeded") == 1
    assert value(text, "eas_conversion_jobs_total", status="cancelled") == 1
    assert value(text, "eas_conversion_job_duration_seconds_sum", status="succeeded") == 330
    assert value(text, "eas_conversion_job_duration_seconds_count", status="cancelled") == 0
