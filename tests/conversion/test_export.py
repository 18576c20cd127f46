"""Fold and export: the stored model reproduces the unfolded trained model; the store write is atomic."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from eas.conversion.data import load_dataset, load_images, training_batch
from eas.conversion.errors import Cancelled, ConversionFailed
from eas.conversion.export import fold_and_save, publish_to_directory, publish_to_store
from eas.conversion.training import TrainingConfig, train_plan
from eas.model.adapters import AdapterConfig
from eas.model.convert import eas_runtime
from eas.model.loading import LoadedModel, load_model
from eas.model.plan import SkipPlan, model_fingerprint
from eas.zoo.llava import build_llava
from model_store import ModelStore


def _trained(jsonl: Path):
    model, processor = build_llava(seed=0)
    data = load_dataset(jsonl, val_size=8)
    plan = SkipPlan(skipped=(1, 3), num_layers=4, criterion="manual", scores=(0.0, 1.0, 0.0, 1.0),
                    fingerprint=model_fingerprint(model))
    train_plan(model, processor, plan, AdapterConfig(), data.train, data.validation,
               TrainingConfig(steps=8, batch_size=8, lr=2e-2), show_bar=False)
    return model, processor, data, plan


def test_stored_folded_model_matches_the_unfolded_trained_model(shapes_jsonl: Path, tmp_path: Path) -> None:
    model, processor, data, plan = _trained(shapes_jsonl)
    model.eval()
    rows = data.validation[:4]
    probe = LoadedModel(model=model, processor=processor)
    prompts = probe.prepare(load_images(rows), [r.question for r in rows])  # left padded, batch of 4
    answers = training_batch(processor, rows)  # right padded, with answers
    with torch.inference_mode():
        unfolded_prompt = model(**prompts).logits
        unfolded_answer = model(**answers).logits
        assert float(torch.stack([p.abs().max() for p in model.parameters() if p.ndim == 3]).max()) > 0  # trained

    reloaded, check = fold_and_save(model, processor, probe, load_images(rows), [r.question for r in rows],
                                    tmp_path / "model")
    assert eas_runtime(model).merged and eas_runtime(reloaded.model).merged
    assert check.relative_diff < 1e-5
    fresh = load_model(tmp_path / "model", device="cpu")  # what a server would load
    assert fresh.plan == plan  # fingerprint and scores survive the round trip
    with torch.inference_mode():
        assert torch.allclose(fresh.model(**prompts).logits, unfolded_prompt, atol=1e-4)
        assert torch.allclose(fresh.model(**answers).logits, unfolded_answer, atol=1e-4)
    keys = {k for k in fresh.model.state_dict() if "language_model" in k}
    assert not any("layers.1.self_attn" in k or "layers.3.self_attn" in k for k in keys)
    assert any("layers.2.self_attn" in k for k in keys)


def test_fold_check_refuses_a_model_that_does_not_round_trip(shapes_jsonl: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor, data, _ = _trained(shapes_jsonl)
    rows = data.validation[:2]
    probe = LoadedModel(model=model, processor=processor)
    import eas.conversion.export as export

    real_fold = export.fold_model

    def broken_fold(m):
        real_fold(m)
        with torch.no_grad():
            m.model.language_model.layers[1].kappa_gate.add_(1.0)  # a wrong bias, as in eas-method.md §9

    monkeypatch.setattr(export, "fold_model", broken_fold)
    with pytest.raises(ConversionFailed, match="does not reproduce"):
        fold_and_save(model, processor, probe, load_images(rows), [r.question for r in rows], tmp_path / "m")


def _model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "scratch"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    return directory


def test_publish_to_store_is_all_or_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = ModelStore(tmp_path / "store")
    source = store.import_directory("tiny", tiny_model_dir)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        publish_to_store(store, "tiny", source, _model_dir(tmp_path), "{}", {}, {}, activate=False, cancel=cancel)
    assert [v.version for v in store.list_versions("tiny")] == ["v1"]
    assert not any((store.root / ".staging").iterdir())
    info = publish_to_store(store, "tiny", source, tmp_path / "scratch", '{"plan": 1}', {"a": 1}, {"k": 2},
                            activate=True)
    assert info.version == "v2" and info.active and info.metadata == {"k": 2} and info.parent == ("tiny", "v1")
    assert (info.path / "plan.json").read_text() == '{"plan": 1}'


def test_publish_to_directory_refuses_a_non_empty_target(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionFailed, match="not empty"):
        publish_to_directory(out, _model_dir(tmp_path), "{}", {})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert publish_to_directory(empty, tmp_path / "scratch", "{}", {}) == empty
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "conversion.json", "eas_manifest.json",
                                                       "plan.json"]


def test_publish_to_store_reports_a_full_disk_as_enospc_and_writes_nothing(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import shutil

    store = ModelStore(tmp_path / "store")
    source = store.import_directory("tiny", tiny_model_dir)
    scratch = _model_dir(tmp_path)
    (scratch / "extra").mkdir()  # a sub-directory: copytree there used to flatten the error into shutil.Error
    (scratch / "extra" / "weights.bin").write_bytes(b"\0" * 64)
    real_copyfile = shutil.copyfile

    def disk_full(src, dst, *, follow_symlinks=True):
        if Path(src).name == "weights.bin":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copyfile(src, dst, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    with pytest.raises(OSError) as failure:
        publish_to_store(store, "tiny", source, scratch, "{}", {}, {}, activate=True)
    monkeypatch.undo()
    assert failure.value.errno == errno.ENOSPC, failure.value
    assert [v.version for v in store.list_versions("tiny")] == ["v1"]
    assert store.active("tiny").version == "v1"
    assert not any((store.root / ".staging").iterdir())
