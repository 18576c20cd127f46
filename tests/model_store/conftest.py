"""Fixtures for model_store tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store import ModelStore


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")
