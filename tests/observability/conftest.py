"""Fixtures for the observability tests: the service tests' tiny models (built once per session) and a
model store holding one of them, plus helpers to read the Prometheus exposition."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from model_store import ModelStore
from tests.service.conftest import ModelDirs, anyio_backend, model_dirs  # noqa: F401  (shared fixtures)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

_SAMPLE = re.compile(r"^([a-zA-Z_][a-zA-Z0-9_]*)(\{[^}]*\})? (\S+)")


def samples(text: str) -> list[tuple[str, str, float]]:
    """(name, label text, value) of every sample line of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out.append((match[1], match[2] or "", float(match[3])))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0.0 when there are none)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for n, lab, v in samples(text) if n == name and all(w in lab for w in wanted))


@pytest.fixture
def store_with_model(tmp_path: Path, model_dirs: ModelDirs) -> ModelStore:  # noqa: F811
    store = ModelStore(tmp_path / "store")
    store.import_directory("tiny", model_dirs.baseline, kind="baseline", activate=True)
    return store
