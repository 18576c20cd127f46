"""`check_checkpoint`: a save_pretrained LLaVA passes; each kind of broken or unsupported directory is refused
with a message naming the problem, and the check writes nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from eas.model.checkpoint import CheckpointError, check_checkpoint


def broken_copy(source: Path, target: Path, damage: Callable[[Path], None]) -> Path:
    shutil.copytree(source, target)
    damage(target)
    return target


def edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        change(config)
        (directory / "config.json").write_text(json.dumps(config))
    return damage


def truncate_weights(directory: Path) -> None:
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[:-64])


def wider_ffn(config: dict) -> None:
    config["text_config"]["intermediate_size"] *= 2


def as_bert(config: dict) -> None:
    config["architectures"], config["model_type"] = ["BertModel"], "bert"


def as_converted(config: dict) -> None:
    config["text_config"]["eas"] = {"plan": {"skipped": [3], "num_layers": 4}, "adapters": {}, "merged": True}


def test_a_save_pretrained_llava_passes(tiny_model_dir: Path) -> None:
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    info = check_checkpoint(tiny_model_dir)
    assert (info.model_class, info.model_type, info.num_layers) == ("LlavaForConditionalGeneration", "llava", 4)
    assert info.processor_class == "LlavaProcessor" and info.weight_files == ("model.safetensors",)
    assert info.parameters > 100_000
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before  # nothing written


@pytest.mark.parametrize("damage,expected", [
    (lambda d: (d / "processor_config.json").unlink(), "no processor"),
    (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "no tokenizer files"),
    (truncate_weights, "weights file model.safetensors is unreadable"),
    (lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file"), "model.safetensors is unreadable"),
    (lambda d: (d / "model.safetensors").unlink(), "no weights"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "weights are pickled"),
    (edit_config(as_bert), "unsupported model class BertModel"),
    (edit_config(wider_ffn), "weights do not match config.json"),
    (edit_config(as_converted), "already EAS-converted"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json cannot be read"),
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
], ids=["no-processor", "no-tokenizer", "truncated", "garbage", "no-weights", "pickled", "bert", "geometry",
        "converted", "bad-json", "no-config"])
def test_broken_directories_are_refused_naming_the_problem(tiny_model_dir: Path, tmp_path: Path, damage,
                                                          expected: str) -> None:
    directory = broken_copy(tiny_model_dir, tmp_path / "model", damage)
    with pytest.raises(CheckpointError, match=expected) as caught:
        check_checkpoint(directory)
    assert str(directory) in str(caught.value) and "\n" not in str(caught.value)


def test_not_a_directory(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="no such directory"):
        check_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a directory"):
        check_checkpoint(tiny_model_dir / "config.json")


def test_a_sharded_checkpoint_with_a_missing_shard(tiny_model_dir: Path, tmp_path: Path) -> None:
    def shard(directory: Path) -> None:
        index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}
        (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))

    directory = broken_copy(tiny_model_dir, tmp_path / "model", shard)
    with pytest.raises(CheckpointError, match=r"weight shard model-00002-of-00002\.safetensors .* is missing"):
        check_checkpoint(directory)
