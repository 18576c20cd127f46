"""No command-line traps: a wrong store, path or argument is one `error:` line with exit code 2 and no
traceback, for every subcommand, and nothing is created or overwritten.

Most cases run in process (typer's CliRunner, through the same group that formats errors for the `eas`
script); a few run `python -m eas_tools.cli` in a subprocess from an empty directory, as a user would, to show
that no `var/store` appears there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eas_tools.cli import app
from model_store import ModelStore

REPO = Path(__file__).resolve().parents[3]


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def one_line_error(output: str, exit_code: int, *needles: str) -> str:
    lines = output.strip().splitlines()
    assert exit_code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[0], output
    return lines[0]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --- eas convert -------------------------------------------------------------------------------------------


def test_convert_refuses_a_store_that_does_not_exist(tmp_path: Path, shapes_jsonl: Path) -> None:
    typo = tmp_path / "stroe"
    result = run("convert", "--store", str(typo), "--model", "easy-vqa-llava", "--dataset", str(shapes_jsonl),
                 "--criterion", "uniform", "--skip-count", "1")
    one_line_error(result.output, result.exit_code, str(typo), "does not exist", "--create-store")
    assert not typo.exists()


def test_convert_refuses_a_directory_that_is_not_a_store(tmp_path: Path, shapes_jsonl: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = run("convert", "--store", str(tmp_path), "--model", "easy-vqa-llava", "--dataset", str(shapes_jsonl),
                 "--criterion", "uniform", "--skip-count", "1")
    one_line_error(result.output, result.exit_code, "is not a model store")
    assert tree(tmp_path) == ["notes.txt"]


def test_convert_refuses_an_unknown_model_before_any_work(tiny_store: ModelStore, shapes_jsonl: Path) -> None:
    result = run("convert", "--store", str(tiny_store.root), "--model", "tiyn", "--dataset", str(shapes_jsonl),
                 "--criterion", "uniform", "--skip-count", "1")
    one_line_error(result.output, result.exit_code, "tiyn")
    assert [v.version for v in tiny_store.list_versions("tiny")] == ["v1"]


def test_a_usage_error_is_one_line() -> None:
    result = run("convert", "--model", "tiny")
    one_line_error(result.output, result.exit_code, "convert: Missing option '--store'")
    result = run("eval", "some-model", "--limit", "many")
    one_line_error(result.output, result.exit_code, "eval: Invalid value for '--limit'")
    result = run("frobnicate")
    one_line_error(result.output, result.exit_code, "No such command 'frobnicate'")


# --- eas eval ----------------------------------------------------------------------------------------------


def subprocess_eas(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EAS_")}
    environment.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "eas_tools.cli", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=300)


def test_eval_on_a_bad_path_is_one_line_and_creates_no_store(tmp_path: Path) -> None:
    result = subprocess_eas(tmp_path, "eval", "./my-modle")
    one_line_error(result.stderr, result.returncode, "./my-modle", "no such directory")
    result = subprocess_eas(tmp_path, "eval", "my-model:v2")  # a store name, but var/store does not exist
    one_line_error(result.stderr, result.returncode, "var/store", "does not exist")
    assert tree(tmp_path) == []


def test_eval_refuses_a_missing_store_a_missing_dataset_and_a_split_for_jsonl(tmp_path: Path,
                                                                              tiny_model_dir: Path,
                                                                              shapes_jsonl: Path) -> None:
    result = run("eval", "tiny", "--store", str(tmp_path / "nowhere"))
    one_line_error(result.output, result.exit_code, "nowhere", "does not exist")
    result = run("eval", str(tiny_model_dir), "--dataset", str(tmp_path / "missing.jsonl"))
    one_line_error(result.output, result.exit_code, "missing.jsonl", "no such file")
    result = run("eval", str(tiny_model_dir), "--dataset", str(shapes_jsonl), "--split", "train")
    one_line_error(result.output, result.exit_code, "--split applies to easy-vqa only")
    result = run("eval", str(tiny_model_dir), "--split", "validation")
    one_line_error(result.output, result.exit_code, "unknown split 'validation'")
    assert tree(tmp_path) == []


def test_eval_of_an_unknown_store_model_is_one_line(tiny_store: ModelStore) -> None:
    result = run("eval", "tiyn", "--store", str(tiny_store.root), "--dataset", "easy-vqa", "--limit", "1")
    one_line_error(result.output, result.exit_code, "tiyn")


def test_eval_of_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("eval", str(tmp_path / "empty"), "--limit", "1")
    one_line_error(result.output, result.exit_code, "cannot load model directory")


# --- eas import --------------------------------------------------------------------------------------------


def test_import_refuses_a_missing_store_a_missing_directory_and_a_bad_name(tmp_path: Path,
                                                                         tiny_model_dir: Path) -> None:
    result = run("import", str(tiny_model_dir), "--name", "mine", "--store", str(tmp_path / "stroe"))
    one_line_error(result.output, result.exit_code, "stroe", "does not exist", "--create-store")
    store = ModelStore(tmp_path / "store")
    result = run("import", str(tmp_path / "no-model"), "--name", "mine", "--store", str(store.root))
    one_line_error(result.output, result.exit_code, "no-model", "no such directory")
    result = run("import", str(tiny_model_dir), "--name", "../mine", "--store", str(store.root))
    one_line_error(result.output, result.exit_code, "invalid model name")
    assert not (tmp_path / "stroe").exists() and store.list_models() == []


def test_import_refuses_a_broken_checkpoint_and_writes_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name != "processor_config.json":
            (broken / item.name).write_bytes(item.read_bytes())
    result = run("import", str(broken), "--name", "mine", "--store", str(tmp_path / "new"), "--create-store")
    one_line_error(result.output, result.exit_code, "no processor")
    assert not (tmp_path / "new").exists()


# --- eas train-default -------------------------------------------------------------------------------------


def test_train_default_needs_out_and_never_overwrites_without_being_told(tmp_path: Path) -> None:
    result = run("train-default")
    one_line_error(result.output, result.exit_code, "Missing option '--out'")
    (tmp_path / "config.json").write_text("{}")
    result = run("train-default", "--out", str(tmp_path), "--steps", "1")
    one_line_error(result.output, result.exit_code, "exists and is not empty", "--overwrite")
    assert (tmp_path / "config.json").read_text() == "{}" and tree(tmp_path) == ["config.json"]
    result = run("train-default", "--out", str(tmp_path / "config.json"))
    one_line_error(result.output, result.exit_code, "is a file")


# --- eas bench ---------------------------------------------------------------------------------------------


def test_bench_refuses_a_store_that_does_not_exist(tmp_path: Path) -> None:
    result = run("bench", "--store", str(tmp_path / "stroe"), "--model", "tiny", "--out", str(tmp_path / "out"))
    one_line_error(result.output, result.exit_code, "stroe", "does not exist")
    assert tree(tmp_path) == []


# --- eas serve ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env,needle", [
    ({"EAS_MAX_BATCH_SIZE": "0"}, "EAS_MAX_BATCH_SIZE"),
    ({"EAS_DEVICE": "tpu"}, "EAS_DEVICE"),
    ({"EAS_MODEL_PATH": "/nonexistent/model"}, "EAS_MODEL_PATH /nonexistent/model is not a directory"),
    ({"EAS_BASELINE_PATH": "/nonexistent/base"}, "EAS_BASELINE_PATH /nonexistent/base is not a directory"),
], ids=["batch-size", "device", "model-path", "baseline-path"])
def test_serve_refuses_bad_configuration_before_starting(env: dict[str, str], needle: str) -> None:
    result = run("serve", "--port", "1", env=env)
    one_line_error(result.output, result.exit_code, needle)


def test_serve_refuses_two_baselines_and_a_bad_log_level(tiny_model_dir: Path) -> None:
    env = {"EAS_MODEL_PATH": str(tiny_model_dir), "EAS_BASELINE_PATH": str(tiny_model_dir)}
    result = run("serve", env=env)
    one_line_error(result.output, result.exit_code, "is not EAS-converted", "EAS_BASELINE_PATH")
    result = run("serve", "--log-level", "loud")
    one_line_error(result.output, result.exit_code, "unknown --log-level 'loud'")
    result = run("serve", "--port", "70000")
    one_line_error(result.output, result.exit_code, "--port")
