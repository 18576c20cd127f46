"""Fixtures for model_store tests: every test runs against both registry backends, SQLite (the store's own
file) and PostgreSQL (a fresh database on the session's throwaway server, tests/model_store/postgres.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store import ModelStore
from tests.model_store.postgres import use_backend

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS, autouse=True)
def registry_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    use_backend(request, monkeypatch, request.param)
    return request.param


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")
