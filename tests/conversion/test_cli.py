"""`eas convert`: clear errors with the right exit codes, and a summary on success."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from eas_tools.cli import app
from model_store import ModelStore

FAST = ["--steps", "4", "--batch-size", "8", "--eval-limit", "4", "--device", "cpu"]


def _run(*args: str):
    return CliRunner().invoke(app, ["convert", *args])


def test_bad_dataset_lists_line_numbers(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "question": "q", "answer": "a"}\n[]\n')
    result = _run("--store", str(tmp_path / "s"), "--model", "tiny", "--dataset", str(bad), "--criterion", "deepest",
                  "--skip-count", "1", "--create-store")
    assert result.exit_code == 2 and not (tmp_path / "s").exists()  # the dataset is refused before the store opens
    assert "line 1: image file not found: a.png" in result.output
    assert "line 2: expected a JSON object" in result.output


def test_request_errors_are_clear(tmp_path: Path) -> None:
    result = _run("--store", str(tmp_path), "--model", "tiny", "--criterion", "cosine")
    assert result.exit_code == 2 and "exactly one budget" in result.output
    result = _run("--store", str(tmp_path), "--model", "tiny", "--criterion", "magic", "--skip-count", "1")
    assert result.exit_code == 2 and "unknown criterion 'magic'" in result.output


def test_unknown_model_is_a_clear_error(tiny_store: ModelStore, shapes_jsonl: Path) -> None:
    result = _run("--store", str(tiny_store.root), "--model", "nope", "--dataset", str(shapes_jsonl),
                  "--criterion", "deepest", "--skip-count", "1", *FAST)
    assert result.exit_code == 2 and "error:" in result.output and "nope" in result.output  # a bad argument


def test_convert_prints_a_summary_and_stores_the_version(tiny_store: ModelStore, shapes_jsonl: Path) -> None:
    result = _run("--store", str(tiny_store.root), "--model", "tiny", "--dataset", str(shapes_jsonl),
                  "--criterion", "uniform", "--skip-fraction", "0.5", "--activate", *FAST)
    assert result.exit_code == 0, result.output
    assert "converted tiny:v1 -> tiny:v2" in result.output
    assert "skipped [1, 3] of 4 (50%)" in result.output and "speedup" in result.output
    assert tiny_store.active("tiny").version == "v2"


def test_json_output(tiny_store: ModelStore, shapes_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    result = _run("--store", str(tiny_store.root), "--model", "tiny", "--dataset", str(shapes_jsonl),
                  "--criterion", "deepest", "--skip-count", "1", "--out", str(out), "--json", *FAST)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert payload["plan"]["skipped"] == [3] and payload["summary"]["path"] == str(out)
