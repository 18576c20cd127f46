"""Datasets: every JSONL row validated up front with line numbers; easy-vqa held-out rows by image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eas.conversion.data import IGNORE_INDEX, DatasetError, load_dataset, read_jsonl, training_batch
from eas.zoo.llava import build_llava
from tests.conversion.conftest import draw


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    draw("red", "circle").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = json.dumps({"image": "ok.png", "question": "what color is the shape?", "answer": "red"})
    return _write(tmp_path / "data.jsonl", [
        good,                                                                               # 1 ok
        '{"image": "ok.png", "question": "what color',                                      # 2 bad JSON
        json.dumps({"image": "missing.png", "question": "q?", "answer": "a"}),               # 3 no file
        json.dumps({"image": "broken.png", "question": "q?", "answer": "a"}),                # 4 unreadable
        json.dumps({"image": "ok.png", "question": "  ", "answer": "red"}),                  # 5 empty question
        json.dumps({"image": "ok.png", "question": "q?", "answer": ""}),                     # 6 empty answer
        json.dumps({"image": "ok.png", "question": "q?"}),                                   # 7 no answer
        "[1, 2]",                                                                           # 8 not an object
        "",                                                                                 # 9 blank: ignored
        good,                                                                               # 10 ok
        json.dumps({"image": "ok.png", "question": 3, "answer": "red"}),                     # 11 wrong type
    ])


def test_bad_rows_are_listed_with_line_numbers(mixed: Path) -> None:
    rows, errors = read_jsonl(mixed)
    assert [r.line for r in rows] == [1, 10]
    assert all(r.image == mixed.parent / "ok.png" for r in rows)  # paths relative to the file
    messages = {e.line: e.message for e in errors}
    assert sorted(messages) == [2, 3, 4, 5, 6, 7, 8, 11]
    assert "invalid JSON" in messages[2]
    assert "image file not found: missing.png" in messages[3]
    assert "unreadable image broken.png" in messages[4]
    assert "empty 'question'" in messages[5]
    assert "empty 'answer'" in messages[6]
    assert "missing 'answer'" in messages[7]
    assert "expected a JSON object" in messages[8]
    assert "'question' must be a string" in messages[11]
    assert str(errors[0]).startswith("line 2: ")


def test_no_usable_rows_is_refused_with_the_full_list(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", ["not json", json.dumps({"image": "x.png", "question": "q", "answer": "a"})])
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert [str(e) for e in info.value.errors] == [
        "line 1: invalid JSON (Expecting value at column 1)", "line 2: image file not found: x.png"]
    assert "no usable rows (2 bad)" in str(info.value) and "line 2:" in str(info.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")


def test_jsonl_validation_is_held_out(shapes_jsonl: Path) -> None:
    data = load_dataset(shapes_jsonl, val_size=8, seed=1)
    assert len(data.validation) == 8 and len(data.train) == 48 - 8
    assert not {id(r) for r in data.validation} & {id(r) for r in data.train}
    assert data.skipped == []
    again = load_dataset(shapes_jsonl, val_size=8, seed=1)
    assert [r.line for r in again.validation] == [r.line for r in data.validation]  # seeded


def test_easy_vqa_holds_out_whole_images() -> None:
    data = load_dataset("easy-vqa", val_size=100, seed=0)
    assert len(data.validation) == 100 and data.is_easy_vqa
    assert not {r.image for r in data.validation} & {r.image for r in data.train}
    assert len(data.train) + 100 <= 38575


def test_training_batch_supervises_only_the_answer(shapes_jsonl: Path) -> None:
    _, processor = build_llava(seed=0)
    rows = load_dataset(shapes_jsonl, val_size=4).train[:3]
    batch = training_batch(processor, rows)
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        supervised = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert tok.decode(supervised) == f" {row.answer}</s>"  # " answer" + EOS
        length = int(batch["attention_mask"][i].sum())
        assert torch.all(batch["attention_mask"][i][:length] == 1)  # right padding
        assert torch.all(batch["labels"][i][length:] == IGNORE_INDEX)
    assert batch["pixel_values"].shape[0] == 3
