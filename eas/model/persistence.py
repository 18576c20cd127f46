"""Save and load EAS-converted models (transformers-notes.md §6; the format: eas/model/artefact.py).

`save_converted` writes format 2: stock tensors and EAS tensors under the `eas` weights variant, a
config.json whose model type is `eas` (the stock one kept under `eas_base`) with an `auto_map` naming
the bundled `modeling_eas.py`, the processor and the checksum manifest. Plain transformers loads such a
directory exactly with `trust_remote_code=True` and refuses it without.

`load_converted` reads format 2 and the first format (a stock config.json with `text_config.eas`,
`model.safetensors`) without running any code from the directory: the stock class loads the stock
tensors, which silently re-initialises any tensor it does not find, so `eas.model.artefact.rebuild`
checks that the missing and unexpected keys are exactly the ones the plan implies, re-applies the
conversion and loads the EAS tensors strictly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel, ProcessorMixin

from eas.manifest import ModelFilesError, write_manifest
from eas.model.artefact import (
    CONFIG_FILE,
    REMOTE_FILE,
    WEIGHTS_VARIANT,
    ArtefactError,
    _eas_save_pretrained,
    from_disk_config,
    is_eas_config,
    quiet_transformers,
    rebuild,
    stock_class,
    stock_config,
    weight_files,
)
from eas.model.convert import stored_conversion
from eas.model.plan import SkipPlan

__all__ = ["is_converted", "load_converted", "load_stock", "quiet_transformers", "save_converted", "upgrade_format"]


def save_converted(model: PreTrainedModel, directory: str | Path, processor: ProcessorMixin | None = None) -> Path:
    """Write weights, config (format 2), the bundled runtime, processor and the checksum manifest."""
    if stored_conversion(model.config) is None:
        raise ValueError("save_converted needs a converted model (no text_config.eas in its config)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _eas_save_pretrained(model, directory)
    if processor is not None:
        processor.save_pretrained(directory)
    write_manifest(directory)
    return directory


def _read_config(path: Path) -> tuple[Any, str | None]:
    """(stock config object, weights variant) of a model directory, plain, format 1 or format 2."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ModelFilesError(f"{path}: config.json is missing")
    try:
        raw = json.loads(file.read_text())
        if isinstance(raw, dict) and is_eas_config(raw):
            with quiet_transformers():
                return stock_config(from_disk_config(raw)), WEIGHTS_VARIANT
        return AutoConfig.from_pretrained(path, trust_remote_code=False), None  # never run a directory's code
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"{path}: config.json is unreadable ({exc})") from exc


def is_converted(path: str | Path) -> bool:
    return stored_conversion(_read_config(Path(path))[0]) is not None


def load_stock(path: Path, config: Any = None, variant: str | None = None) -> tuple[PreTrainedModel, dict]:
    """The stock class's from_pretrained (fp32), with file problems turned into ModelFilesError."""
    if config is None:
        config, variant = _read_config(path)
    try:
        cls = stock_class(config)
    except ArtefactError as exc:
        raise ModelFilesError(f"{path}: {exc}") from exc
    for file in weight_files(path, variant):
        if not file.is_file():
            raise ModelFilesError(f"{path}: tensor file {file.name} is missing")
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(path, config=config, dtype=torch.float32, output_loading_info=True,
                                              variant=variant)
    except Exception as exc:  # safetensors/OS errors on a damaged file: name it, never crash the caller
        raise ModelFilesError(f"{path}: model weights could not be read ({type(exc).__name__}: {exc})") from exc
    return model, info


def load_converted(path: str | Path) -> tuple[PreTrainedModel, SkipPlan]:
    """Load a directory written by `save_converted` (either format); returns the model (eval mode) and its plan."""
    path = Path(path)
    config, variant = _read_config(path)
    stored = stored_conversion(config)
    if stored is None:
        raise ModelFilesError(f"{path}: not an EAS-converted model (no text_config.eas)")
    model, info = load_stock(path, config, variant)
    try:
        model = rebuild(model, info, weight_files(path, variant), str(path))
    except ArtefactError as exc:
        raise ModelFilesError(str(exc)) from exc
    return model, stored[0]


def upgrade_format(directory: str | Path) -> bool:
    """Rewrite a first-format converted directory as format 2 in place: config.json, the weights (same
    tensors, now under the `eas` variant) and modeling_eas.py; every other file is kept byte for byte;
    the manifest is rewritten. Refuses (ModelFilesError) unless the rewritten directory loads to the same
    tensors. Returns False when the directory is already format 2."""
    directory = Path(directory)
    _, variant = _read_config(directory)
    if variant == WEIGHTS_VARIANT:
        return False
    model, _ = load_converted(directory)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_weights = [*weight_files(directory, None), directory / "model.safetensors.index.json"]
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        staged = Path(tmp)
        _eas_save_pretrained(model, staged)
        new_files = [CONFIG_FILE, REMOTE_FILE, *(f.name for f in weight_files(staged, WEIGHTS_VARIANT))]
        index = f"model.safetensors.index.{WEIGHTS_VARIANT}.json"
        if (staged / index).is_file():
            new_files.append(index)
        for name in new_files:
            shutil.copyfile(staged / name, directory / name)  # fresh file modes, like the rest of the directory
    for file in old_weights:
        file.unlink(missing_ok=True)
    write_manifest(directory)
    after, _ = load_converted(directory)
    state = after.state_dict()
    if set(state) != set(before) or any(not torch.equal(state[k], v) for k, v in before.items()):
        raise ModelFilesError(f"{directory}: the upgraded directory does not load to the same tensors")
    return True
