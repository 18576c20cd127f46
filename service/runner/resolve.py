"""Decide which model directories to serve under which variant name, from settings or the model store.

The variant name follows what a directory *is*, never only which setting named it: `eas` is always an
EAS-converted model (a skip plan in its config, `eas.model.persistence.is_converted`), `baseline` the
unskipped model it is compared with.

- `EAS_MODEL_PATH`: that directory, bypassing the store (tests, benchmarks, ad-hoc runs). Converted, it is
  served as `eas`, with `EAS_BASELINE_PATH` (if set) as `baseline`. Not converted (a plain
  `save_pretrained` model), it is served as `baseline`, alone: `EAS_BASELINE_PATH` would name a second
  baseline and is refused. `EAS_BASELINE_PATH` alone is served as `baseline`.
- Otherwise the store's active version of `EAS_MODEL` (default: the store's default model; a store with no
  model is seeded with the embedded demo model first, service/seed.py). A converted version is served as
  `eas`, with its unskipped parent (`baseline_of`) as `baseline` unless `EAS_LOAD_BASELINE=false`; an
  active baseline version is served alone, as `baseline` (`model_store.serving.served_versions`, which the
  bench uses too). (`eas import` and the admin import refuse converted directories, so a store's
  `baseline` kind is never converted.)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from eas.manifest import ModelFilesError
from service.runner.runner import VariantInfo
from service.settings import Settings

if TYPE_CHECKING:
    from model_store import ModelStore


def resolve_variants(settings: Settings) -> list[VariantInfo]:
    """Variants to load, the default one first. Runs store I/O (checksums): call it off the event loop."""
    if settings.model_path is not None or settings.baseline_path is not None:
        return _from_paths(settings)
    return _from_store(settings)


def _from_paths(settings: Settings) -> list[VariantInfo]:
    model_path, baseline_path = settings.model_path, settings.baseline_path
    for setting, path in (("EAS_MODEL_PATH", model_path), ("EAS_BASELINE_PATH", baseline_path)):
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"{setting} {path} is not a directory")
    variants = []
    if model_path is not None:
        converted = _is_converted(model_path, "EAS_MODEL_PATH")
        if not converted and baseline_path is not None and settings.load_baseline:
            raise ValueError(f"EAS_MODEL_PATH {model_path} is not EAS-converted (no skip plan in its config), so it "
                             "is served as `baseline`; EAS_BASELINE_PATH cannot name a second baseline: unset it, "
                             "or point EAS_MODEL_PATH at a converted model")
        variants.append(_local("eas" if converted else "baseline", model_path, settings))
        if not converted or not settings.load_baseline:
            return variants
    if baseline_path is not None:
        variants.append(_local("baseline", baseline_path, settings))
    return variants


def _is_converted(path: Path, setting: str) -> bool:
    from eas.model.persistence import is_converted  # reads config.json with transformers' AutoConfig

    try:
        return is_converted(path)
    except ModelFilesError as exc:
        raise ValueError(f"{setting}: {exc}") from exc


def _local(variant: str, path: Path, settings: Settings) -> VariantInfo:
    return VariantInfo(variant=variant, model=settings.model or path.name, version="local", kind="local", path=path)


def _from_store(settings: Settings) -> list[VariantInfo]:
    from service.seed import open_seeded  # imported lazily: path-only deployments never touch the store

    store = open_seeded(settings.model_store)  # a fresh store serves the embedded demo model
    name = settings.model or store.default_model()
    if name is None:
        raise LookupError(f"the model store at {settings.model_store} is empty: import or convert a model, "
                          "or serve a directory with EAS_MODEL_PATH")
    return store_variants(store, name, load_baseline=settings.load_baseline)


def store_variants(store: ModelStore, name: str, version: str | None = None, *,
                   load_baseline: bool = True) -> list[VariantInfo]:
    """The variants serving `name:version` (default: the active version) means, the default first
    (`model_store.serving.served_versions`), each verified against its checksums here, once: the loader
    then does not hash the files again (`VariantInfo.verified`). `ModelFilesError` names a bad file before
    anything is loaded. Store I/O: call it off the event loop."""
    from model_store.serving import served_versions

    variants = []
    for served in served_versions(store, name, version, with_baseline=load_baseline):
        info = served.info
        variants.append(VariantInfo(variant=served.variant, model=info.name, version=info.version, kind=info.kind,
                                    path=store.path_for_loading(info.name, info.version),
                                    parent=":".join(info.parent) if info.parent else None, verified=True))
    return variants
