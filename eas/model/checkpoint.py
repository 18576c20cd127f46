"""Check that a directory is an HF checkpoint this project can serve and convert, before it is imported.

`check_checkpoint(path)` reads everything a later load depends on and refuses with `CheckpointError`,
whose message names the first problem:

1. `config.json` parses (`AutoConfig`);
2. the model is not already EAS-converted (an import adds an unskipped *baseline*);
3. the model class is supported: it is built from the config on the meta device (no memory, no weights)
   through `AutoModelForImageTextToText`, the class `load_model` uses for a plain directory, and its
   decoder must pass `locate_decoder`, the same check a conversion runs (eas/model/arch.py);
4. the weights are readable: every safetensors file the checkpoint names exists and its header parses
   (the library checks that the header's offsets cover the file exactly, so a truncated file is
   caught), and the tensors match the model built from the config: the same number with the same shapes.
   (Names are not compared: transformers renames keys between the on-disk and in-memory layouts.)
   Only safetensors are accepted; pickled `pytorch_model.bin` weights are refused;
5. the processor loads with `AutoProcessor`, has an image processor and a tokenizer, and builds the
   serving prompt (eas/model/prompting.py).

Nothing is written. The CLI (`eas import`) and the admin API (`POST /admin/models/{name}/versions`)
both call this before `ModelStore.import_directory`; see docs/admin.md.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel

from eas.model.arch import UnsupportedModelError, locate_decoder
from eas.model.convert import stored_conversion
from eas.model.persistence import quiet_transformers
from eas.model.processors import load_processor
from eas.model.prompting import build_prompt

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """The directory cannot be imported; the message names the problem (one line)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What the check learned, for the import's version metadata and the caller's summary."""

    path: Path
    model_class: str
    model_type: str
    num_layers: int
    parameters: int
    weight_files: tuple[str, ...]
    processor_class: str

    def to_metadata(self) -> dict[str, object]:
        return {"model_class": self.model_class, "model_type": self.model_type, "num_layers": self.num_layers,
                "parameters": self.parameters, "processor_class": self.processor_class}


def check_checkpoint(path: str | Path) -> CheckpointInfo:
    """Validate an HF-format checkpoint directory (see the module docstring); raise CheckpointError."""
    path = Path(path)
    try:
        return _check(path)
    except (OSError, ValueError) as exc:  # a path the OS refuses (permissions, a NUL byte, too long)
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot be read: {_one_line(exc)}") from exc


def _check(path: Path) -> CheckpointInfo:
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config = _read_config(path)
    if stored_conversion(config) is not None:
        raise CheckpointError(f"{path}: already EAS-converted (its config has a skip plan); import the unskipped "
                              "source model and convert that")
    skeleton = _build_on_meta(path, config)
    try:
        decoder = locate_decoder(skeleton)
    except UnsupportedModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    files = _weight_files(path)
    checkpoint_shapes = _read_headers(path, files)
    _compare_shapes(path, type(skeleton).__name__, _model_shapes(skeleton), checkpoint_shapes)
    processor = _load_processor(path)
    return CheckpointInfo(path=path, model_class=type(skeleton).__name__, model_type=str(config.model_type),
                          num_layers=decoder.num_layers,
                          parameters=sum(_numel(shape) * count for shape, count in checkpoint_shapes.items()),
                          weight_files=tuple(f.name for f in files), processor_class=type(processor).__name__)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _read_config(path: Path) -> PretrainedConfig:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: config.json is missing (not a save_pretrained directory)")
    from eas.model.artefact import is_eas_directory

    if is_eas_directory(path):  # format 2 (docs/eas-core.md): named before AutoConfig asks for remote code
        raise CheckpointError(f"{path}: already EAS-converted (an EAS model directory); import the unskipped "
                              "source model and convert that")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)  # an import never runs its code
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: config.json cannot be read: {_one_line(exc)}") from exc


def _build_on_meta(path: Path, config: PretrainedConfig) -> PreTrainedModel:
    """The class `load_model` would use, with every tensor on the meta device (shapes only, no memory)."""
    try:
        with torch.device("meta"), quiet_transformers():
            return AutoModelForImageTextToText.from_config(config)
    except ValueError as exc:  # a config class the image-text-to-text auto class does not know
        raise CheckpointError(f"{path}: unsupported model class {', '.join(config.architectures or ['?'])} "
                              f"(model_type {config.model_type!r}): not a vision-language model that "
                              "AutoModelForImageTextToText loads") from exc
    except Exception as exc:  # a config the model's own constructor rejects
        raise CheckpointError(f"{path}: cannot build the model from config.json: {_one_line(exc)}") from exc


def _weight_files(path: Path) -> list[Path]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: {SAFETENSORS_INDEX} is unreadable: {_one_line(exc)}") from exc
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: weight shard {missing[0]} named by {SAFETENSORS_INDEX} is missing")
        return [path / n for n in names]
    if (path / SAFETENSORS_SINGLE).is_file():
        return [path / SAFETENSORS_SINGLE]
    pickled = [n for n in _PICKLED if (path / n).is_file()]
    if pickled:
        raise CheckpointError(f"{path}: weights are pickled ({pickled[0]}); only safetensors are accepted: load "
                              "the model and re-save it with save_pretrained")
    raise CheckpointError(f"{path}: no weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})")


def _read_headers(path: Path, files: list[Path]) -> Counter[tuple[int, ...]]:
    """The multiset of tensor shapes in the checkpoint; any unreadable header names its file."""
    shapes: Counter[tuple[int, ...]] = Counter()
    for file in files:
        try:
            with safe_open(file, "pt") as fh:
                for key in list(fh.keys()):  # a safe_open handle is not iterable
                    shapes[tuple(fh.get_slice(key).get_shape())] += 1
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: weights file {file.name} is unreadable: {_one_line(exc)}") from exc
    return shapes


def _model_shapes(model: PreTrainedModel) -> Counter[tuple[int, ...]]:
    """Shapes of what save_pretrained writes: each parameter once (tied ones are saved once) and the
    persistent buffers."""
    shapes: Counter[tuple[int, ...]] = Counter(tuple(p.shape) for _, p in model.named_parameters())
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                shapes[tuple(buffer.shape)] += 1
    return shapes


def _compare_shapes(path: Path, model_class: str, expected: Counter, found: Counter) -> None:
    if expected == found:
        return
    missing = sorted((expected - found).elements())
    extra = sorted((found - expected).elements())
    parts = [f"{sum(found.values())} tensors in the checkpoint, {sum(expected.values())} in the {model_class} "
             "that config.json describes"]
    if missing:
        parts.append(f"missing shapes {[list(s) for s in missing[:3]]}")
    if extra:
        parts.append(f"unexpected shapes {[list(s) for s in extra[:3]]}")
    raise CheckpointError(f"{path}: weights do not match config.json: " + "; ".join(parts))


def _load_processor(path: Path):
    # Named up front: AutoProcessor's own messages for absent files are long and talk about the Hub.
    if not any((path / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")):
        raise CheckpointError(f"{path}: no processor (processor_config.json or preprocessor_config.json); save "
                              "it beside the model with processor.save_pretrained")
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); save the "
                              "processor with processor.save_pretrained")
    try:
        with quiet_transformers():
            processor = load_processor(path)  # the loader's own: works without torchvision video processors
    except Exception as exc:  # missing or malformed processor files surface as many exception types
        raise CheckpointError(f"{path}: processor cannot be loaded with AutoProcessor: {_one_line(exc)}") from exc
    # Without a processor config AutoProcessor falls back to a bare tokenizer (or image processor).
    for part in ("image_processor", "tokenizer"):
        if getattr(processor, part, None) is None:
            raise CheckpointError(f"{path}: no processor with an image processor and a tokenizer (AutoProcessor "
                                  f"found a {type(processor).__name__}); save the processor with save_pretrained")
    try:
        build_prompt(processor, "what is in the image?")
    except Exception as exc:  # a broken chat template
        raise CheckpointError(f"{path}: the processor cannot build a prompt: {_one_line(exc)}") from exc
    return processor


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


