"""Seeding a store that holds no model with the embedded demo model and its shipped conversion (service/seed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import service.seed as seed_module
from eas.manifest import write_manifest
from model_store import ModelFilesError, ModelStore
from service.seed import EMBEDDED_MODEL_NAME, open_seeded, seed_embedded
from tests.model_store.helpers import dummy_writer, make_model_dir, make_writable, tree
from tests.service.conftest import ModelDirs


def test_seeds_the_embedded_model_once(tmp_path: Path) -> None:
    embedded = make_model_dir(tmp_path / "embedded" / "easy-vqa-llava", b"trained weights")
    root = tmp_path / "store"

    store = ModelStore(root)
    seeded = seed_embedded(store, embedded)

    assert seeded == store.get_version(EMBEDDED_MODEL_NAME, "v1")
    assert store.list_models() == [EMBEDDED_MODEL_NAME] == ["easy-vqa-llava"]
    info = store.active(EMBEDDED_MODEL_NAME)
    assert (info.version, info.kind, info.parent, info.active) == ("v1", "baseline", None, True)
    assert info.metadata["source"] == "embedded"
    assert store.default_model() == EMBEDDED_MODEL_NAME
    assert (info.path / "model.safetensors").read_bytes() == b"trained weights"
    store.verify(EMBEDDED_MODEL_NAME, "v1")
    assert tree(embedded) == ["config.json", "model.safetensors", "tokenizer", "tokenizer/vocab.txt"]  # untouched

    # Idempotent: seeding again imports nothing more.
    assert seed_embedded(ModelStore(root), embedded) is None
    assert [v.version for v in store.list_versions(EMBEDDED_MODEL_NAME)] == ["v1"]


def test_no_seeding_into_a_store_that_has_models(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ModelStore(root).add_version("mine", dummy_writer(), kind="baseline")
    embedded = make_model_dir(tmp_path / "embedded", b"x")

    store = ModelStore(root)
    assert seed_embedded(store, embedded) is None
    assert store.list_models() == ["mine"]
    assert store.default_model() == "mine"


def test_absent_or_incomplete_embedded_dir_means_no_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path / "s1")
    assert seed_embedded(store, tmp_path / "does-not-exist") is None
    assert store.list_models() == []

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("model comes later")
    store = ModelStore(tmp_path / "s2")
    assert seed_embedded(store, empty) is None
    assert store.list_models() == []

    # The package default, while it is absent (it is produced by another build step).
    monkeypatch.setattr(seed_module, "DEFAULT_EMBEDDED_DIR", tmp_path / "not-built-yet")
    assert open_seeded(tmp_path / "s3").list_models() == []


def test_corrupted_embedded_model_is_refused(tmp_path: Path) -> None:
    embedded = make_model_dir(tmp_path / "embedded", b"good")
    write_manifest(embedded)
    make_writable(embedded / "model.safetensors")
    (embedded / "model.safetensors").write_bytes(b"bad!")

    with pytest.raises(ModelFilesError, match=r"model\.safetensors"):
        seed_embedded(ModelStore(tmp_path / "store"), embedded)
    store = ModelStore(tmp_path / "store")
    assert store.list_models() == []
    assert tree(store.root / "models") == [] and tree(store.root / ".staging") == []


def test_an_embedded_conversion_is_seeded_as_the_active_converted_version(tmp_path: Path) -> None:
    embedded = make_model_dir(tmp_path / "embedded" / "easy-vqa-llava", b"baseline weights")
    make_model_dir(tmp_path / "embedded" / "easy-vqa-llava-eas", b"converted weights")
    store = ModelStore(tmp_path / "store")
    seed_embedded(store, embedded)
    active = store.active(EMBEDDED_MODEL_NAME)
    assert (active.version, active.kind, active.parent) == ("v2", "converted", (EMBEDDED_MODEL_NAME, "v1"))
    assert (active.path / "model.safetensors").read_bytes() == b"converted weights"
    assert store.baseline_of(EMBEDDED_MODEL_NAME, "v2").version == "v1"
    seed_embedded(ModelStore(tmp_path / "store"), embedded)  # idempotent
    assert [v.version for v in store.list_versions(EMBEDDED_MODEL_NAME)] == ["v1", "v2"]


def test_a_fresh_store_gets_the_shipped_model_and_its_conversion(tmp_path: Path) -> None:
    """What `eas serve` does on a fresh clone (the package's embedded directories, no argument)."""
    store = open_seeded(tmp_path / "store")
    versions = store.list_versions(EMBEDDED_MODEL_NAME)
    assert [(v.version, v.kind, v.active) for v in versions] == [("v1", "baseline", False), ("v2", "converted", True)]
    assert versions[0].metadata["imported_from"] == str(seed_module.DEFAULT_EMBEDDED_DIR)
    assert versions[1].metadata["imported_from"] == str(seed_module.DEFAULT_EMBEDDED_DIR) + "-eas"
    assert versions[1].parent == (EMBEDDED_MODEL_NAME, "v1")


def test_eas_convert_seeds_the_store_it_creates_and_eas_import_does_not(tmp_path: Path, shapes_jsonl: Path,
                                                                          model_dirs: ModelDirs) -> None:
    from typer.testing import CliRunner

    from eas_tools.cli import app

    converted_in = tmp_path / "convert-store"
    result = CliRunner().invoke(app, ["convert", "--store", str(converted_in), "--create-store", "--model", "nope",
                                      "--dataset", str(shapes_jsonl), "--criterion", "deepest", "--skip-count", "1",
                                      "--device", "cpu"])
    assert result.exit_code == 1 and "nope" in result.output  # the seeded store has no model "nope"
    versions = ModelStore(converted_in).list_versions(EMBEDDED_MODEL_NAME)
    assert [(v.version, v.kind, v.active) for v in versions] == [("v1", "baseline", False), ("v2", "converted", True)]

    imported_in = tmp_path / "import-store"
    result = CliRunner().invoke(app, ["import", str(model_dirs.baseline), "--name", "mine", "--store",
                                      str(imported_in), "--create-store"])
    assert result.exit_code == 0, result.output
    assert ModelStore(imported_in).list_models() == ["mine"]
