"""A job's requested activation is recorded in its row with its outcome (issue 17, M3)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from model_store import ModelStore
from model_store.registry import DB_NAME


def _store_with_version(tmp_path: Path) -> ModelStore:
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    store = ModelStore(tmp_path / "store")
    store.import_directory("m", source, kind="baseline")
    return store


def test_activation_pending_then_outcome(tmp_path: Path) -> None:
    store = _store_with_version(tmp_path)
    plain = store.jobs.create("m", "v1", {"steps": 1})
    assert plain.activation is None
    store.jobs.update(plain.id, status="cancelled")
    job = store.jobs.create("m", "v1", {"activate": True}, activate=True)
    assert job.activation == "pending" and job.to_dict()["activation"] == "pending"
    store.jobs.update(job.id, status="running")
    store.jobs.update(job.id, status="succeeded", result={"version": "v2"})
    assert store.jobs.get(job.id).activation == "pending"  # succeeded, not yet acted on
    done = store.jobs.set_activation(job.id, "failed", "load failed: bad weights")
    assert (done.activation, done.activation_error) == ("failed", "load failed: bad weights")
    with pytest.raises(ValueError):
        store.jobs.set_activation(job.id, "maybe")  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["failed", "cancel_queued", "interrupted"])
def test_pending_activation_fails_with_its_job(tmp_path: Path, how: str) -> None:
    store = _store_with_version(tmp_path)
    job = store.jobs.create("m", "v1", {"activate": True}, activate=True)
    if how == "failed":
        store.jobs.update(job.id, status="failed", error="boom")
    elif how == "cancel_queued":
        store.jobs.request_cancel(job.id)
    else:
        store.jobs.fail_interrupted("interrupted")
    after = store.jobs.get(job.id)
    assert after.activation == "failed" and after.activation_error


def test_old_store_gains_the_columns(tmp_path: Path, registry_backend: str) -> None:
    if registry_backend == "postgresql":
        pytest.skip("a store from before the columns existed is a SQLite file; PostgreSQL registries start with them")
    store = _store_with_version(tmp_path)
    job = store.jobs.create("m", "v1", {})
    conn = sqlite3.connect(store.root / DB_NAME)
    conn.execute("ALTER TABLE jobs DROP COLUMN activation")
    conn.execute("ALTER TABLE jobs DROP COLUMN activation_error")
    conn.commit()
    conn.close()
    reopened = ModelStore(store.root)
    assert reopened.jobs.get(job.id).activation is None
