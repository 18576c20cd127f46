"""Fixtures shared across test folders: a saved tiny LLaVA, a small shapes dataset, a store holding it.

(tests/conversion/conftest.py defines the same names for its own tests; these serve the jobs and admin tests.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eas.zoo.llava import build_llava
from model_store import ModelStore
from tests.conversion.conftest import write_shapes_dataset
from tests.model_store.postgres import postgres_server  # noqa: F401  (one throwaway PostgreSQL per session)

# Each served variant would otherwise get a model process of its own (service/runner/process.py), which
# costs a fresh interpreter importing torch (seconds) per app the suite starts, and servers the suite
# spawns inherit this too. tests/service/test_model_process.py turns it on where it is the subject, and
# passes `model_process=None` to test the default.
os.environ.setdefault("EAS_MODEL_PROCESS", "false")
# Freezing the heap (service/heap.py) in the test process would keep the cycles of every app the suite
# builds and drops; tests/service/test_heap.py turns it on.
os.environ.setdefault("EAS_GC_FREEZE", "false")
# The fuzzers and hardening tests send thousands of deliberate errors from one address, which the client
# error budget (service/penalties.py) would answer with 429s; tests/hardening/test_penalties.py turns it on.
os.environ.setdefault("EAS_CLIENT_ERROR_BURST", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny LLaVA (seeded; identical in every run)."""
    directory = tmp_path_factory.mktemp("tiny-llava")
    model, processor = build_llava(seed=0)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def shapes_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture
def tiny_store(tmp_path: Path, tiny_model_dir: Path) -> ModelStore:
    """A fresh store whose model "tiny" has one active baseline version, v1."""
    store = ModelStore(tmp_path / "store")
    store.import_directory("tiny", tiny_model_dir, kind="baseline", activate=True)
    return store
