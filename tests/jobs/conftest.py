"""The jobs tests run against both registry backends, like tests/model_store/ (its conftest says how)."""

from __future__ import annotations

import pytest

from tests.model_store.postgres import use_backend


@pytest.fixture(params=["sqlite", "postgresql"], autouse=True)
def registry_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    use_backend(request, monkeypatch, request.param)
    return request.param
