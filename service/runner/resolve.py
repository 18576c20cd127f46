"""Decide which model directories to serve under which variant name, from settings or the model store.

The variant name follows what a directory *is*, never only which setting named it: `eas` is always an
EAS-converted model (a skip plan in its config, `eas.model.persistence.is_converted`), `baseline` the
unskipped model it is compared with.

- `EAS_MODEL_PATH`: that directory, bypassing the store (tests, benchmarks, ad-hoc runs). Converted, it is
  served as `eas`, with `EAS_BASELINE_PATH` (if set) as `baseline`. Not converted (a plain
  `save_pretrained` model), it is served as `baseline`, alone: `EAS_BASELINE_PATH` would name a second
  baseline and is refused. `EAS_BASELINE_PATH` alone is served as `baseline`.
- Otherwise the store's active version of `EAS_MODEL` (default: the store's default model). A converted
  version is served as `eas`, with its unskipped parent (`baseline_of`) as `baseline` unless
  `EAS_LOAD_BASELINE=false`; an active baseline version is served alone, as `baseline`. (`eas import`
  and the admin import refuse converted directories, so a store's `baseline` kind is never converted.)
"""

from __future__ import annotations

from pathlib import Path

from eas.manifest import ModelFilesError
from service.runner.runner import VariantInfo
from service.settings import Settings


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
    from model_store import ModelStore  # imported lazily: path-only deployments never touch the store

    store = ModelStore.open(settings.model_store)
    name = settings.model or store.default_model()
    if name is None:
        raise LookupError(f"the model store at {settings.model_store} is empty: import or convert a model, "
                          "or serve a directory with EAS_MODEL_PATH")
    active = store.get_version(name)
    path = store.path_for_loading(active.name, active.version)  # verifies checksums
    if active.kind != "converted":
        return [VariantInfo(variant="baseline", model=active.name, version=active.version, kind=active.kind,
                            path=path)]
    variants = [VariantInfo(variant="eas", model=active.name, version=active.version, kind=active.kind,
                            path=path, parent=":".join(active.parent) if active.parent else None)]
    if settings.load_baseline:
        base = store.baseline_of(active.name, active.version)
        if base is not None:
            variants.append(VariantInfo(variant="baseline", model=base.name, version=base.version,
                                        kind=base.kind, path=store.path_for_loading(base.name, base.version)))
    return variants
