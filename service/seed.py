"""Seed a model store that holds no model yet with the embedded demo model, so a fresh install answers at once.

The repository ships `model_store/embedded/easy-vqa-llava/` (docs/default-model.md) and, beside it as
`easy-vqa-llava-eas/`, its EAS conversion. A store without any model gets the first as `easy-vqa-llava:v1`
(baseline) and the second as v2 (converted from v1, active), so `eas serve` serves `eas` beside `baseline`.
The service seeds the store it opens at startup; `eas convert` seeds the store it converts in. A store that
already holds a model is never touched, and a missing embedded directory just means no seeding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import model_store
from model_store import ModelStore, VersionInfo

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "easy-vqa-llava"
# Package data of `model_store` (pyproject.toml), trained by `eas train-default`; may be absent.
DEFAULT_EMBEDDED_DIR = Path(model_store.__file__).resolve().parent / "embedded" / EMBEDDED_MODEL_NAME
# The shipped EAS conversion sits beside the model as `<name>-eas/`.
EMBEDDED_CONVERTED_SUFFIX = "-eas"


def seed_embedded(store: ModelStore, embedded_dir: str | Path | None = None, *,
                  name: str = EMBEDDED_MODEL_NAME) -> VersionInfo | None:
    """Import the embedded model (default: the package's) as `name` v1 and its shipped conversion, if any, as
    the active v2, when the store holds no model; else nothing.

    Returns the baseline version created, or None when nothing was imported (store not empty, directory
    absent, or another process seeded first: of several processes seeding one empty store, exactly one
    imports). A corrupted embedded model raises `ModelFilesError` and leaves the store empty.
    """
    src = DEFAULT_EMBEDDED_DIR if embedded_dir is None else Path(embedded_dir)
    if not (src / "config.json").is_file():
        if src.exists():
            log.warning("%s has no config.json; not seeding the model store from it", src)
        else:
            log.info("no embedded model at %s; not seeding the model store", src)
        return None
    info = store.import_if_empty(name, src, metadata={"source": "embedded", "imported_from": str(src)})
    if info is None:
        return None
    log.info("seeded %s from %s", info.ref, src)
    converted = src.with_name(src.name + EMBEDDED_CONVERTED_SUFFIX)
    if (converted / "config.json").is_file():
        eas = store.import_directory(name, converted, kind="converted", parent=(name, info.version),
                                     metadata={"source": "embedded", "imported_from": str(converted)},
                                     activate=True)
        log.info("seeded %s (EAS conversion of %s) from %s", eas.ref, info.ref, converted)
    return info


def open_seeded(root: str | Path) -> ModelStore:
    """Open (creating if needed) the store at `root`, seeded as above."""
    store = ModelStore(root)
    seed_embedded(store)
    return store
