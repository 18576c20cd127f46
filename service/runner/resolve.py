"""Decide which model directories to serve under which variant name, from settings or the model store.

- `EAS_MODEL_PATH` (and optionally `EAS_BASELINE_PATH`): serve those directories as `eas` / `baseline`,
  bypassing the store (tests, benchmarks, ad-hoc runs).
- Otherwise the store's active version of `EAS_MODEL` (default: the store's default model). A converted
  version is served as `eas`, with its unskipped parent (`baseline_of`) as `baseline` unless
  `EAS_LOAD_BASELINE=false`; an active baseline version is served alone, as `baseline`.
"""

from __future__ import annotations

from service.runner.runner import VariantInfo
from service.settings import Settings


def resolve_variants(settings: Settings) -> list[VariantInfo]:
    """Variants to load, the default one first. Runs store I/O (checksums): call it off the event loop."""
    if settings.model_path is not None or settings.baseline_path is not None:
        return _from_paths(settings)
    return _from_store(settings)


def _from_paths(settings: Settings) -> list[VariantInfo]:
    variants = []
    for variant, path in (("eas", settings.model_path), ("baseline", settings.baseline_path)):
        if path is None:
            continue
        if variant == "baseline" and settings.model_path is not None and not settings.load_baseline:
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"EAS_{'MODEL' if variant == 'eas' else 'BASELINE'}_PATH {path} "
                                    "is not a directory")
        variants.append(VariantInfo(variant=variant, model=settings.model or path.name, version="local",
                                    kind="local", path=path))
    return variants


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
