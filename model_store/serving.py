"""Which variants a stored version is served as: the one answer the service and the bench share.

A converted version is served as `eas`, beside its unskipped source (`ModelStore.baseline_of`) as
`baseline`; a baseline version is served alone, as `baseline` (docs/serving.md, "What is served"). The
default variant comes first. Nothing here reads model files: whoever loads them verifies their checksums,
once per load (docs/model-store.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from model_store.registry import VersionInfo
from model_store.store import ModelStore

Variant = Literal["eas", "baseline"]


@dataclass(frozen=True)
class ServedVersion:
    """One variant name and the store version served under it."""

    variant: Variant
    info: VersionInfo


def served_versions(store: ModelStore, name: str, version: str | None = None, *,
                    with_baseline: bool = True) -> list[ServedVersion]:
    """What serving `name:version` (default: its active version) means, the default variant first:
    converted -> [eas, its baseline] (the baseline left out with `with_baseline=False`), baseline ->
    [baseline]. `NotFound` for an unknown model or version."""
    info = store.get_version(name, version)
    if info.kind != "converted":
        return [ServedVersion("baseline", info)]
    served = [ServedVersion("eas", info)]
    base = store.baseline_of(info.name, info.version) if with_baseline else None
    if base is not None:
        served.append(ServedVersion("baseline", base))
    return served
