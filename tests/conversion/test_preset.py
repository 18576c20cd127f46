"""`preset`: fills only what a request leaves out, reaches the pipeline, and the CLI and admin job accept it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from eas.conversion import pipeline
from eas.conversion.errors import ConversionFailed
from eas.conversion.job import build_request
from eas.conversion.pipeline import PRESETS, ConversionRequest, convert
from eas_tools.cli import app
from model_store import ModelStore
from service.admin.requests import parse_conversion
from service.errors import ValidationFailed

QUICK = PRESETS["quick"]


def _request(**fields) -> ConversionRequest:
    return ConversionRequest(store="/tmp/never-opened", model="m", skip_fraction=0.5, **fields)


def test_quick_preset_fills_the_fields_left_out() -> None:
    request = _request(preset="quick")
    assert request.criterion == QUICK["criterion"] == "recovery"
    assert request.steps == QUICK["steps"] and request.eval_limit == QUICK["eval_limit"]
    assert request.lr == QUICK["lr"]
    assert request.recovery.model_dump(exclude_unset=True) == QUICK["recovery"]
    # negative control: without a preset every field keeps its own default
    plain = _request()
    assert (plain.criterion, plain.steps, plain.eval_limit, plain.lr) == ("eas", None, None, None)
    assert plain.training_steps(10_000) == pipeline.DEFAULT_STEPS != request.training_steps(10_000)


def test_explicit_fields_win_over_the_preset() -> None:
    request = _request(preset="quick", criterion="cosine", steps=7, eval_limit=9, lr=1e-4,
                       recovery={"held_out_rows": 5})
    assert (request.criterion, request.steps, request.eval_limit, request.lr) == ("cosine", 7, 9, 1e-4)
    # nested settings merge key by key: the preset's probe length stays, the explicit row count wins
    assert request.recovery.held_out_rows == 5 and request.recovery.steps == QUICK["recovery"]["steps"]
    # explicit None is given too: the full test split
    assert _request(preset="quick", eval_limit=None).eval_limit is None
    # --epochs replaces the preset's step count instead of being overridden by it
    by_epochs = _request(preset="quick", epochs=2.0)
    assert by_epochs.steps is None and by_epochs.training_steps(800) == 100


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValidationError, match="quick"):
        _request(preset="fastest")


def test_preset_round_trips_through_json() -> None:
    request = _request(preset="quick", steps=7)
    again = ConversionRequest.model_validate_json(request.model_dump_json())
    assert again == request  # what conversion.json records reproduces the same conversion


def test_preset_settings_reach_the_pipeline(tiny_store: ModelStore, shapes_jsonl: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The quick preset's real lengths are for the demo model; a scaled-down preset of the same shape checks
    # that each value is what the conversion actually ran with.
    tiny = {"criterion": "recovery", "recovery": {"steps": 2, "held_out_rows": 4}, "steps": 3, "lr": 2e-3,
            "eval_limit": 5}
    monkeypatch.setitem(PRESETS, "quick", tiny)
    request = ConversionRequest(
        store=tiny_store.root, model="tiny", dataset=str(shapes_jsonl), preset="quick", skip_count=2, batch_size=8,
        val_size=8, latency_runs=1, latency_prompts=1, latency_new_tokens=2, show_progress_bar=False, device="cpu",
    )
    result = convert(request, open_store=ModelStore)
    assert result.plan.criterion == "recovery"
    assert result.criterion_details["settings"] == {"steps": 2, "held_out_rows": 4, "lr": None}
    assert result.criterion_details["held_out_rows"] == 4
    assert result.training.config.steps == 3 and len(result.training.curve.loss) == 3
    assert result.training.config.peak_lr == 2e-3
    assert result.converted_accuracy.total == 5
    assert tiny_store.get_version("tiny", result.version).metadata["preset"] == "quick"


def _captured_cli_request(monkeypatch: pytest.MonkeyPatch, store: ModelStore, *options: str) -> ConversionRequest:
    seen: list[ConversionRequest] = []

    def capture(request: ConversionRequest, **_: object):
        seen.append(request)
        raise ConversionFailed("stopped by the test")

    monkeypatch.setattr(pipeline, "convert", capture)
    result = CliRunner().invoke(app, ["convert", "--store", str(store.root), "--model", "tiny",
                                      "--skip-fraction", "0.5", *options])
    assert result.exit_code == 1 and "stopped by the test" in result.output, result.output
    return seen[0]


def test_cli_preset_fills_and_options_override(tiny_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    request = _captured_cli_request(monkeypatch, tiny_store, "--preset", "quick")
    assert request.preset == "quick" and request.criterion == "recovery" and request.steps == QUICK["steps"]
    assert request.eval_limit == QUICK["eval_limit"]
    request = _captured_cli_request(monkeypatch, tiny_store, "--preset", "quick", "--criterion", "kl",
                                    "--steps", "11", "--eval-limit", "12")
    assert (request.criterion, request.steps, request.eval_limit) == ("kl", 11, 12)
    request = _captured_cli_request(monkeypatch, tiny_store)  # no preset: the plain defaults
    assert (request.preset, request.criterion, request.steps, request.eval_limit) == (None, "eas", None, None)


def test_cli_refuses_an_unknown_preset(tiny_store: ModelStore) -> None:
    result = CliRunner().invoke(app, ["convert", "--store", str(tiny_store.root), "--model", "tiny",
                                      "--skip-fraction", "0.5", "--preset", "fastest"])
    assert result.exit_code == 2 and "quick" in result.output


def test_admin_job_accepts_a_preset(tmp_path: Path) -> None:
    body = {"model": "tiny", "skip_fraction": 0.5, "preset": "quick", "steps": 9}
    conversion = parse_conversion(body, tmp_path)  # POST /admin/convert's validation
    assert conversion.params == {"preset": "quick", "skip_fraction": 0.5, "steps": 9}  # what the submitter set
    request = build_request(tmp_path, {"model": "tiny", **conversion.params})  # what the worker process runs
    assert request == conversion.request
    assert request.criterion == "recovery" and request.steps == 9 and request.eval_limit == QUICK["eval_limit"]
    with pytest.raises(ValidationFailed, match="preset"):
        parse_conversion({**body, "preset": "fastest"}, tmp_path)
