"""Saving and loading converted models: identical logits, strict key checks, damaged files refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eas.manifest import ModelFilesError, write_manifest
from eas.model.fold import fold_model
from eas.model.loading import load_model
from eas.model.persistence import load_converted, save_converted
from tests.core.helpers import converted_llava, llava_batch


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("merged", [False, True])
def test_saved_model_reloads_to_identical_logits(tmp_path: Path, merged: bool) -> None:
    model, processor = converted_llava((0, 2))
    if merged:
        fold_model(model)
    batch = llava_batch(processor)
    save_converted(model, tmp_path, processor)
    keys = load_file(tmp_path / "model.eas.safetensors").keys()
    assert not [k for k in keys if ("layers.0.self_attn" in k or "layers.2.self_attn" in k) and "vision" not in k]
    assert [k for k in keys if "layers.1.self_attn.q_proj" in k and "vision" not in k]
    loaded, plan = load_converted(tmp_path)
    assert plan.skipped == (0, 2)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    served = load_model(tmp_path, device="cpu")
    assert served.plan == plan and len(served.answer(*_pairs())) == 2


def _pairs():
    from tests.core.helpers import QUESTIONS, images

    return images(2), QUESTIONS


def test_missing_tensor_file_is_refused(tmp_path: Path) -> None:
    model, processor = converted_llava()
    save_converted(model, tmp_path, processor)
    (tmp_path / "model.eas.safetensors").unlink()
    with pytest.raises(ModelFilesError, match=r"model\.eas\.safetensors is missing"):
        load_model(tmp_path)
    with pytest.raises(ModelFilesError, match="missing"):
        load_converted(tmp_path)


def test_corrupted_tensor_file_is_refused(tmp_path: Path) -> None:
    model, processor = converted_llava()
    save_converted(model, tmp_path, processor)
    path = tmp_path / "model.eas.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFilesError, match="corrupted"):
        load_model(tmp_path)
    # Without a manifest, a truncated file is still refused by the loader with a clear error.
    (tmp_path / "eas_manifest.json").unlink()
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ModelFilesError, match="could not be read"):
        load_converted(tmp_path)


def test_checkpoint_missing_an_adapter_tensor_is_refused(tmp_path: Path) -> None:
    """A silently re-initialised tensor would be a bug: a dropped EAS tensor must be named."""
    model, processor = converted_llava((0, 2))
    save_converted(model, tmp_path, processor)
    tensors = load_file(tmp_path / "model.eas.safetensors")
    dropped = next(k for k in tensors if ".pia.C.weight" in k)
    del tensors[dropped]
    save_file(tensors, tmp_path / "model.eas.safetensors", metadata={"format": "pt"})
    write_manifest(tmp_path)
    with pytest.raises(ModelFilesError, match=r"EAS tensors missing.*pia\.C\.weight"):
        load_converted(tmp_path)


def test_checkpoint_with_attention_of_a_skipped_layer_is_refused(tmp_path: Path) -> None:
    model, processor = converted_llava((0, 2))
    save_converted(model, tmp_path, processor)
    tensors = load_file(tmp_path / "model.eas.safetensors")
    layer1 = next(k for k in tensors if "layers.1.self_attn.q_proj.weight" in k and "vision" not in k)
    tensors[layer1.replace("layers.1.", "layers.0.")] = tensors[layer1].clone()
    save_file(tensors, tmp_path / "model.eas.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFilesError, match=r"unknown tensors|plan removes"):
        load_converted(tmp_path)


def test_plan_is_recorded_in_config(tmp_path: Path) -> None:
    model, processor = converted_llava((1, 3))
    fold_model(model)
    save_converted(model, tmp_path, processor)
    eas = json.loads((tmp_path / "config.json").read_text())["text_config"]["eas"]
    assert eas["plan"]["skipped"] == [1, 3] and eas["merged"] is True and eas["adapters"]["router"] is False
