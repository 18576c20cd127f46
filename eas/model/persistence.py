"""Save and load EAS-converted models in standard HF format (transformers-notes.md §6).

A converted model is saved with `save_pretrained`: the skipped layers' attention tensors are simply
absent, adapter (or folded) tensors are extra, and the plan lives in `text_config.eas`.

Loading goes through the stock class, which silently re-initialises any tensor it does not find. So
the loader computes exactly which keys must be missing (the removed attention) and which must be
unexpected (the EAS tensors) from the plan, refuses the directory if the checkpoint differs in any
way, re-applies the conversion and loads the EAS tensors strictly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedModel, ProcessorMixin

from eas.manifest import ModelFilesError, write_manifest
from eas.model.arch import locate_decoder
from eas.model.convert import apply_plan, stored_conversion
from eas.model.plan import SkipPlan


def save_converted(model: PreTrainedModel, directory: str | Path, processor: ProcessorMixin | None = None) -> Path:
    """Write weights, config (with the plan), processor and the checksum manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)
    write_manifest(directory)
    return directory


def _read_config(path: Path):
    if not (path / "config.json").is_file():
        raise ModelFilesError(f"{path}: config.json is missing")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"{path}: config.json is unreadable ({exc})") from exc


def is_converted(path: str | Path) -> bool:
    return stored_conversion(_read_config(Path(path))) is not None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own warnings off for a block: the stock loader prints a load report of the keys we
    expect to differ, and the checkpoint check reports what it finds itself."""
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


def _tensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return [path / "model.safetensors"]


def load_stock(path: Path, config=None) -> tuple[PreTrainedModel, dict]:
    """The stock class's from_pretrained (fp32), with file problems turned into ModelFilesError."""
    config = config or _read_config(path)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ModelFilesError(f"{path}: config names no known architecture ({arch})")
    for file in _tensor_files(path):
        if not file.is_file():
            raise ModelFilesError(f"{path}: tensor file {file.name} is missing")
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:  # safetensors/OS errors on a damaged file: name it, never crash the caller
        raise ModelFilesError(f"{path}: model weights could not be read ({type(exc).__name__}: {exc})") from exc
    return model, info


def load_converted(path: str | Path) -> tuple[PreTrainedModel, SkipPlan]:
    """Load a directory written by `save_converted`; returns the model (eval mode) and its plan."""
    path = Path(path)
    config = _read_config(path)
    stored = stored_conversion(config)
    if stored is None:
        raise ModelFilesError(f"{path}: not an EAS-converted model (no text_config.eas)")
    plan, adapters, merged = stored
    model, info = load_stock(path, config)
    if getattr(model.config.get_text_config(decoder=True), "eas", None) is not None:
        delattr(model.config.get_text_config(decoder=True), "eas")  # apply_plan records it again
    stock_keys = set(model.state_dict())
    # The plan's fingerprint names the *source* model; this skeleton holds the converted weights.
    apply_plan(model, plan, adapters, merged=merged, check_fingerprint=False)
    converted_keys = set(model.state_dict())
    expected_missing, expected_unexpected = stock_keys - converted_keys, converted_keys - stock_keys
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    if missing != expected_missing or unexpected != expected_unexpected or info.get("mismatched_keys"):
        problems = []
        if lost := sorted(missing - expected_missing):
            problems.append(f"tensors missing from the checkpoint: {lost[:5]}")
        if extra := sorted(unexpected - expected_unexpected):
            problems.append(f"unknown tensors in the checkpoint: {extra[:5]}")
        if absent := sorted(expected_unexpected - unexpected):
            problems.append(f"EAS tensors missing from the checkpoint: {absent[:5]}")
        if stale := sorted(expected_missing - missing):
            problems.append(f"tensors that the plan removes are present: {stale[:5]}")
        if info.get("mismatched_keys"):
            problems.append(f"tensors with the wrong shape: {list(info['mismatched_keys'])[:5]}")
        raise ModelFilesError(f"{path}: checkpoint does not match its EAS plan; " + "; ".join(problems))
    _load_eas_tensors(model, path, sorted(expected_unexpected))
    return model.eval(), plan


def _load_eas_tensors(model: PreTrainedModel, path: Path, keys: list[str]) -> None:
    """Copy the EAS tensors (named in memory) from the checkpoint (named in the on-disk layout)."""
    state = model.state_dict()
    mem_prefix = locate_decoder(model).path + ".layers."
    on_disk: dict[str, Path] = {}
    for file in _tensor_files(path):
        with safe_open(file, "pt") as fh:
            on_disk.update(dict.fromkeys(fh.keys(), file))
    # The decoder's layers may sit under another prefix on disk (LLaVA's legacy layout): find it from
    # one layer key that both layouts share.
    layers = locate_decoder(model).layers
    probe = next(f"{i}.mlp.down_proj.weight" for i in range(len(layers)))
    matches = [k for k in on_disk if k.endswith(".layers." + probe) or k == "layers." + probe]
    if len(matches) != 1:
        raise ModelFilesError(f"{path}: cannot locate the decoder layers in the checkpoint")
    disk_prefix = matches[0][: -len(probe)]
    with torch.no_grad():
        for key in keys:
            if not key.startswith(mem_prefix):
                raise ModelFilesError(f"{path}: unexpected EAS tensor outside the decoder layers: {key}")
            disk_key = disk_prefix + key[len(mem_prefix):]
            if disk_key not in on_disk:
                raise ModelFilesError(f"{path}: tensor {disk_key} is missing")
            with safe_open(on_disk[disk_key], "pt") as fh:
                tensor = fh.get_tensor(disk_key)
            target = state[key]
            if tensor.shape != target.shape:
                raise ModelFilesError(f"{path}: tensor {disk_key} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(target.shape)}")
            target.copy_(tensor.to(target.dtype))
