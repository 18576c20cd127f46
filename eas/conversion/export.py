"""Fold the trained adapters and write the converted model: to the store (atomically) or to a directory.

`fold_and_save` folds in place (`eas.model.fold.fold_model`, exact, eas-method.md §8), saves the folded
model to a private scratch directory with `save_converted` (standard HF weights without the skipped
layers' attention tensors, plan in `text_config.eas`) and reloads it through the serving loader. The
reloaded model's logits on a probe batch must match the *unfolded* trained model's, so every conversion
proves that what it stores is what it trained.

Publishing copies that directory plus the conversion record (plan.json, conversion.json) into a model store
through its `add_version` — all or nothing, kind "converted", parent = the source version — or into a
fresh `--out` directory (written beside it, renamed into place). The source directory is only ever read.
The library does not import the store: it talks to whatever the caller opened through `VersionStore`, the
few methods it needs (`model_store.ModelStore` is one).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, ProcessorMixin

from eas.conversion.errors import ConversionFailed, check_cancel
from eas.files import copy_tree
from eas.manifest import write_manifest
from eas.model.fold import fold_model
from eas.model.loading import LoadedModel, load_model
from eas.model.persistence import save_converted

PLAN_FILE = "plan.json"
REPORT_FILE = "conversion.json"
FOLD_TOLERANCE = 1e-4  # max |Δ logit| / max |logit|; fp32 folds are ~1e-6 (eas-method.md §8.3)


@dataclass(frozen=True)
class FoldCheck:
    max_abs_diff: float
    relative_diff: float
    logits_scale: float

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "relative_diff": self.relative_diff,
                "logits_scale": self.logits_scale}


@torch.inference_mode()
def _logits(model: PreTrainedModel, batch) -> torch.Tensor:
    return model(**batch, use_cache=False).logits.float()


def fold_and_save(model: PreTrainedModel, processor: ProcessorMixin, probe: LoadedModel, images: list,
                  questions: list[str], directory: Path) -> tuple[LoadedModel, FoldCheck]:
    """Fold `model` in place, save it to `directory`, reload it; compare logits with the unfolded model."""
    model.eval()
    batch = probe.prepare(images, questions)
    reference = _logits(model, batch)
    fold_model(model)
    save_converted(model, directory, processor)
    reloaded = load_model(directory, device=probe.device, dtype=torch.float32, name="converted")
    diff = float((_logits(reloaded.model, reloaded.prepare(images, questions)) - reference).abs().max())
    scale = float(reference.abs().max())
    check = FoldCheck(max_abs_diff=diff, relative_diff=diff / max(scale, 1e-12), logits_scale=scale)
    if check.relative_diff > FOLD_TOLERANCE:
        raise ConversionFailed(
            f"the folded, reloaded model does not reproduce the trained model (max |Δlogit| {diff:.3g} on logits "
            f"up to {scale:.3g}); nothing was written"
        )
    return reloaded, check


def _write_record(directory: Path, plan_json: str, report: dict[str, Any]) -> None:
    (directory / PLAN_FILE).write_text(plan_json)
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False))


class StoredVersion(Protocol):
    """What a conversion reads of a store version (`model_store.VersionInfo` is one)."""

    name: str
    version: str
    ref: str
    path: Path


class VersionStore(Protocol):
    """The part of a model store a conversion uses (`model_store.ModelStore` is one): read the source
    version, verify its files, add the converted version."""

    def get_version(self, name: str, version: str | None = None) -> StoredVersion: ...

    def conversion_source(self, name: str, version: str | None = None) -> StoredVersion: ...

    def verify(self, name: str, version: str | None = None) -> StoredVersion: ...

    def add_version(self, name: str, write: Any, *, kind: Any, parent: tuple[str, str] | None = None,
                    metadata: dict[str, Any] | None = None, activate: bool = False) -> StoredVersion: ...


def publish_to_store(store: VersionStore, name: str, parent: StoredVersion, model_dir: Path, plan_json: str,
                     report: dict[str, Any], metadata: dict[str, Any], *, activate: bool,
                     cancel: threading.Event | None = None) -> StoredVersion:
    """A new converted version of `name` (parent = the source version); the store is untouched on failure."""

    def write(directory: Path) -> None:
        check_cancel(cancel, "export")  # last chance: raising here leaves no version and no staging
        copy_tree(model_dir, directory)  # a full disk surfaces as ENOSPC
        _write_record(directory, plan_json, report)
        check_cancel(cancel, "export")

    return store.add_version(name, write, kind="converted", parent=(parent.name, parent.version),
                             metadata=metadata, activate=activate)


def publish_to_directory(out: Path, model_dir: Path, plan_json: str, report: dict[str, Any],
                         cancel: threading.Event | None = None) -> Path:
    """Write a plain model directory at `out` (which must not exist yet); all or nothing."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionFailed(f"{out} already exists and is not empty; choose a new --out directory")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
        copy_tree(model_dir, partial)
        _write_record(partial, plan_json, report)
        write_manifest(partial)
        check_cancel(cancel, "export")
        if out.exists():
            out.rmdir()  # the empty directory the caller may have created
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
