"""Serving directories with EAS_MODEL_PATH / EAS_BASELINE_PATH: the variant name follows what a directory is.
An unconverted model is never labelled or served as `eas` (service/runner/resolve.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.runner.resolve import resolve_variants
from service.settings import Settings
from tests.service.conftest import ModelDirs, image_bytes, multipart, running_app


def labels(**settings) -> list[tuple[str, str]]:
    return [(v.variant, v.path.name) for v in resolve_variants(Settings(device="cpu", **settings))]


def test_a_plain_model_path_is_served_as_baseline(tiny_model_dir: Path) -> None:
    assert labels(model_path=tiny_model_dir) == [("baseline", tiny_model_dir.name)]
    # EAS_LOAD_BASELINE=false drops the second directory, so there is no clash to refuse
    assert labels(model_path=tiny_model_dir, baseline_path=tiny_model_dir, load_baseline=False) == [
        ("baseline", tiny_model_dir.name)]


def test_a_converted_model_path_is_eas_with_its_baseline(model_dirs: ModelDirs) -> None:
    assert labels(model_path=model_dirs.eas, baseline_path=model_dirs.baseline) == [
        ("eas", "tiny-eas"), ("baseline", "tiny-baseline")]
    assert labels(model_path=model_dirs.eas) == [("eas", "tiny-eas")]
    assert labels(model_path=model_dirs.eas, baseline_path=model_dirs.baseline, load_baseline=False) == [
        ("eas", "tiny-eas")]
    assert labels(baseline_path=model_dirs.baseline) == [("baseline", "tiny-baseline")]


def test_two_baselines_and_bad_directories_are_refused(model_dirs: ModelDirs, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"is not EAS-converted .* EAS_BASELINE_PATH cannot name a second baseline"):
        labels(model_path=model_dirs.baseline, baseline_path=model_dirs.baseline)
    with pytest.raises(FileNotFoundError, match=r"EAS_MODEL_PATH .* is not a directory"):
        labels(model_path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"EAS_MODEL_PATH: .*config\.json is missing"):
        labels(model_path=tmp_path / "empty")


@pytest.mark.anyio
async def test_serving_a_plain_directory_answers_as_baseline_and_has_no_eas(tiny_model_dir: Path) -> None:
    settings = Settings(model_path=tiny_model_dir, device="cpu", dtype="fp32", api_token=None, admin_token=None,
                        max_batch_wait_ms=2.0, shutdown_timeout_s=5.0)
    async with running_app(settings) as (_app, client):
        answered = await client.post("/v1/answer", **multipart(image_bytes(), "what color is the shape?",
                                                                 max_new_tokens="2"))
        assert answered.status_code == 200 and answered.json()["variant"] == "baseline"
        refused = await client.post("/v1/answer", **multipart(image_bytes(), "what color is the shape?",
                                                                variant="eas"))
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "variant_not_found"
