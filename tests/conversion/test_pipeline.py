"""`convert()` end to end on a tiny model: what it writes, and that failures and cancels write nothing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from eas.conversion import pipeline
from eas.conversion.data import DatasetError
from eas.conversion.errors import Cancelled, ConversionFailed
from eas.conversion.export import PLAN_FILE, REPORT_FILE
from eas.conversion.pipeline import STAGES, ConversionRequest, ConversionResult, ProgressEvent
from eas.model.loading import load_model
from eas.model.plan import SkipPlan
from model_store import ModelStore
from tests.conversion.conftest import fast_request


def convert(request: ConversionRequest, **kwargs: object) -> ConversionResult:
    """The library's convert() against the tests' real model store (the library never opens one itself)."""
    return pipeline.convert(request, open_store=ModelStore, **kwargs)  # type: ignore[arg-type]


def _snapshot(store: ModelStore) -> dict:
    """Everything a conversion could change: registry rows and every file under the store root."""
    files = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")
                   if "store.sqlite3" not in p.name)
    versions = [(v.version, v.kind, v.active) for m in store.list_models() for v in store.list_versions(m)]
    return {"files": files, "versions": versions}


def test_end_to_end_writes_a_loadable_converted_version(tiny_store: ModelStore, shapes_jsonl: Path) -> None:
    events: list[ProgressEvent] = []
    result = convert(fast_request(store=tiny_store.root, dataset=str(shapes_jsonl)), progress=events.append)

    assert result.version == "v2" and result.source_version == "v1"
    info = tiny_store.get_version("tiny", "v2")
    assert info.kind == "converted" and info.parent == ("tiny", "v1") and not info.active
    assert info.metadata["criterion"] == "cosine" and info.metadata["skipped"] == list(result.plan.skipped)
    tiny_store.verify("tiny", "v2")  # sealed with a manifest covering plan.json and conversion.json

    plan = SkipPlan.from_json((info.path / PLAN_FILE).read_text())
    assert plan == result.plan and plan.fingerprint and plan.criterion == "cosine" and len(plan.scores) == 4
    record = json.loads((info.path / REPORT_FILE).read_text())
    assert len(record["training"]["curve"]["loss"]) == 6 and record["training"]["curve"]["epoch_loss"]
    assert record["latency"]["speedup"] > 0 and record["source_accuracy"]["split"] == "validation"
    assert record["request"]["dataset"] == str(shapes_jsonl)

    # HF weights without the skipped attention tensors; loads through the serving loader and answers
    from safetensors import safe_open
    with safe_open(info.path / "model.eas.safetensors", "pt") as fh:
        keys = list(fh.keys())
    for i in plan.skipped:
        assert not any(f"layers.{i}.self_attn." in k for k in keys)
    loaded = load_model(tiny_store.path_for_loading("tiny", "v2"), device="cpu")
    assert loaded.plan.skipped == plan.skipped
    assert result.fold_check.relative_diff < 1e-5

    # progress: every stage, fractions within 0..1 and non-decreasing
    assert [s for s in STAGES if any(e.stage == s for e in events)] == list(STAGES)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[0] >= 0 and fractions[-1] == pytest.approx(1.0)
    tiny_store.verify("tiny", "v1")  # the source is untouched


def _cancel_at(stage: str, cancel: threading.Event):
    def progress(event: ProgressEvent) -> None:
        if event.stage == stage:
            cancel.set()
    return progress


@pytest.mark.parametrize("stage", ["criterion", "train", "export"])
def test_cancelled_conversion_leaves_the_store_unchanged(stage: str, tiny_store: ModelStore,
                                                         shapes_jsonl: Path) -> None:
    before = _snapshot(tiny_store)
    cancel = threading.Event()
    criterion = "eas" if stage == "criterion" else "uniform"
    with pytest.raises(Cancelled):
        convert(fast_request(store=tiny_store.root, dataset=str(shapes_jsonl), criterion=criterion),
                progress=_cancel_at(stage, cancel), cancel=cancel)
    assert _snapshot(tiny_store) == before
    assert not any((tiny_store.root / ".staging").iterdir())  # no staging leftovers
    reopened = ModelStore(tiny_store.root)
    assert [v.version for v in reopened.list_versions("tiny")] == ["v1"]


def test_cancelled_out_directory_is_not_created(tiny_store: ModelStore, shapes_jsonl: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    out = tmp_path / "converted"
    with pytest.raises(Cancelled):
        convert(fast_request(store=tiny_store.root, dataset=str(shapes_jsonl), out=out),
                progress=_cancel_at("export", cancel), cancel=cancel)
    assert not out.exists() and list(tmp_path.glob(".converted*")) == []


def test_failed_conversion_leaves_the_store_unchanged(tiny_store: ModelStore, shapes_jsonl: Path) -> None:
    before = _snapshot(tiny_store)
    with pytest.raises(ConversionFailed, match="out of reach"):
        convert(fast_request(store=tiny_store.root, dataset=str(shapes_jsonl), skip_count=None, target_speedup=50.0))
    assert _snapshot(tiny_store) == before


def test_bad_dataset_is_refused_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "nope.png", "question": "q", "answer": "a"}\n{oops\n')
    store_root = tmp_path / "never-opened"
    with pytest.raises(DatasetError) as info:
        convert(fast_request(store=store_root, dataset=str(bad)))
    assert [e.line for e in info.value.errors] == [1, 2]
    assert not store_root.exists()  # refused before the store (or the model) was even opened


def test_skipped_rows_are_reported_and_out_directory_written(tiny_store: ModelStore, shapes_jsonl: Path,
                                                             tmp_path: Path) -> None:
    dataset = tmp_path / "with-bad-rows.jsonl"
    rows = shapes_jsonl.read_text().splitlines()
    images = shapes_jsonl.parent / "images"
    rows = [r.replace('"images/', f'"{images}/') for r in rows]  # absolute paths: the file moved
    dataset.write_text("\n".join([*rows[:20], "not json", *rows[20:], '{"image": "x.png"}']) + "\n")
    out = tmp_path / "out"
    result = convert(fast_request(store=tiny_store.root, dataset=str(dataset), out=out, criterion="deepest",
                                  skip_fraction=0.5, skip_count=None))
    assert result.skipped_rows[0] == "line 21: invalid JSON (Expecting value at column 1)"
    assert result.skipped_rows[1].startswith("line 50: missing 'question'")
    assert result.version is None and Path(result.path) == out and result.plan.skipped == (2, 3)
    assert [v.version for v in tiny_store.list_versions("tiny")] == ["v1"]  # --out leaves the store alone
    loaded = load_model(out, device="cpu")
    with torch.inference_mode():
        assert loaded.answer([loaded_image(shapes_jsonl)], ["what color is the shape?"])  # it generates
    assert (out / PLAN_FILE).is_file() and (out / REPORT_FILE).is_file()


def loaded_image(jsonl: Path):
    from PIL import Image

    return Image.open(jsonl.parent / "images" / "red-circle.png").convert("RGB")


def test_converted_source_is_refused(tiny_store: ModelStore, shapes_jsonl: Path) -> None:
    convert(fast_request(store=tiny_store.root, dataset=str(shapes_jsonl), criterion="uniform"))
    with pytest.raises(ConversionFailed, match="already converted"):
        convert(fast_request(store=tiny_store.root, dataset=str(shapes_jsonl), version="v2"))


def test_no_version_named_converts_the_baseline_of_an_active_conversion(tiny_store: ModelStore,
                                                                        shapes_jsonl: Path) -> None:
    """What a fresh `make serve` store looks like (v2, a conversion, active): `eas convert` without --version
    converts v1 again instead of refusing."""
    convert(fast_request(store=tiny_store.root, dataset=str(shapes_jsonl), criterion="uniform", activate=True))
    assert tiny_store.active("tiny").kind == "converted"
    result = convert(fast_request(store=tiny_store.root, dataset=str(shapes_jsonl), criterion="uniform"))
    assert result.source_version == "v1"
    assert tiny_store.get_version("tiny", result.version).parent == ("tiny", "v1")


def test_threads_apply_to_the_call_only(tiny_store: ModelStore, shapes_jsonl: Path) -> None:
    seen = []
    torch.set_num_threads(2)
    result = convert(fast_request(store=tiny_store.root, dataset=str(shapes_jsonl), criterion="deepest",
                                  threads=1), progress=lambda e: seen.append(torch.get_num_threads()))
    assert set(seen) == {1} and torch.get_num_threads() == 2
    assert result.source_val_loss > 0 and result.summary()["source_val_loss"] == result.source_val_loss
