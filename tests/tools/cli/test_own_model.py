"""Your own model, end to end through the `eas` command line as a user runs it (subprocesses): a plain
`save_pretrained` LLaVA is imported as a baseline, converted with quick settings, evaluated on a JSONL
dataset, and the store then serves the conversion as `eas` beside the import as `baseline`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eas.zoo.llava import build_llava
from model_store import ModelStore
from service.runner.resolve import resolve_variants
from service.settings import Settings

REPO = Path(__file__).resolve().parents[3]
QUICK = ["--criterion", "uniform", "--skip-count", "1", "--steps", "5", "--batch-size", "8", "--no-accuracy",
         "--device", "cpu", "--threads", "1"]


def eas(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAS_")}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    result = subprocess.run([sys.executable, "-m", "eas_tools.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"eas {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture
def user_model(tmp_path: Path) -> Path:
    """What a user has: a plain save_pretrained directory (model + processor, no EAS manifest)."""
    directory = tmp_path / "my-llava"
    model, processor = build_llava(seed=3)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_import_convert_eval_then_serve(tmp_path: Path, user_model: Path, shapes_jsonl: Path) -> None:
    store = tmp_path / "store"
    imported = json.loads(eas("import", str(user_model), "--name", "my-llava", "--store", str(store),
                              "--create-store", "--json", cwd=tmp_path).stdout)
    assert (imported["version"], imported["kind"], imported["active"]) == ("v1", "baseline", True)
    assert imported["metadata"]["model_class"] == "LlavaForConditionalGeneration"

    converted = eas("convert", "--store", str(store), "--model", "my-llava", "--dataset", str(shapes_jsonl),
                    "--activate", *QUICK, cwd=tmp_path)
    assert "converted my-llava:v1 -> my-llava:v2" in converted.stdout
    assert "uniform; skipped [2] of 4" in converted.stdout

    report = json.loads(eas("eval", "my-llava", "--store", str(store), "--dataset", str(shapes_jsonl), "--limit",
                            "8", "--batch-size", "4", "--threads", "1", "--json", cwd=tmp_path).stdout)
    assert report["dataset"] == str(shapes_jsonl) and report["total"] == 8
    assert report["per_type"] is None and report["split"] is None  # a JSONL file has neither
    assert 0 <= report["correct"] <= 8

    versions = ModelStore(store).list_versions("my-llava")
    assert [(v.version, v.kind, v.active) for v in versions] == [("v1", "baseline", False), ("v2", "converted", True)]
    served = resolve_variants(Settings(model_store=store, model="my-llava"))
    assert [(v.variant, v.version) for v in served] == [("eas", "v2"), ("baseline", "v1")]
    assert tmp_path.joinpath("var").exists() is False  # no stray default store
