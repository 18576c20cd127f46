"""Seeding from the embedded model, and several processes opening and writing one store at once."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

import model_store.store as store_module
from eas.manifest import write_manifest
from model_store import EMBEDDED_MODEL_NAME, Conflict, ModelFilesError, ModelStore
from tests.model_store.helpers import dummy_writer, make_model_dir, make_writable, tree

SPAWN = multiprocessing.get_context("spawn")


def test_open_seeds_the_embedded_model_once(tmp_path: Path) -> None:
    embedded = make_model_dir(tmp_path / "embedded" / "easy-vqa-llava", b"trained weights")
    root = tmp_path / "store"

    store = ModelStore.open(root, embedded_dir=embedded)

    assert store.list_models() == [EMBEDDED_MODEL_NAME] == ["easy-vqa-llava"]
    info = store.active(EMBEDDED_MODEL_NAME)
    assert (info.version, info.kind, info.parent, info.active) == ("v1", "baseline", None, True)
    assert info.metadata["source"] == "embedded"
    assert store.default_model() == EMBEDDED_MODEL_NAME
    assert (info.path / "model.safetensors").read_bytes() == b"trained weights"
    store.verify(EMBEDDED_MODEL_NAME, "v1")
    assert tree(embedded) == ["config.json", "model.safetensors", "tokenizer", "tokenizer/vocab.txt"]  # untouched

    # Idempotent: reopening (with or without the embedded dir) imports nothing more.
    ModelStore.open(root, embedded_dir=embedded)
    assert [v.version for v in store.list_versions(EMBEDDED_MODEL_NAME)] == ["v1"]


def test_no_seeding_into_a_store_that_has_models(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ModelStore(root).add_version("mine", dummy_writer(), kind="baseline")
    embedded = make_model_dir(tmp_path / "embedded", b"x")

    store = ModelStore.open(root, embedded_dir=embedded)
    assert store.list_models() == ["mine"]
    assert store.default_model() == "mine"


def test_absent_or_incomplete_embedded_dir_means_no_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore.open(tmp_path / "s1", embedded_dir=tmp_path / "does-not-exist")
    assert store.list_models() == []

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("model comes later")
    assert ModelStore.open(tmp_path / "s2", embedded_dir=empty).list_models() == []

    # The package default, while it is absent (it is produced by another build step).
    monkeypatch.setattr(store_module, "DEFAULT_EMBEDDED_DIR", tmp_path / "not-built-yet")
    assert ModelStore.open(tmp_path / "s3").list_models() == []


def test_corrupted_embedded_model_is_refused(tmp_path: Path) -> None:
    embedded = make_model_dir(tmp_path / "embedded", b"good")
    write_manifest(embedded)
    make_writable(embedded / "model.safetensors")
    (embedded / "model.safetensors").write_bytes(b"bad!")

    with pytest.raises(ModelFilesError, match=r"model\.safetensors"):
        ModelStore.open(tmp_path / "store", embedded_dir=embedded)
    store = ModelStore(tmp_path / "store")
    assert store.list_models() == []
    assert tree(store.root / "models") == [] and tree(store.root / ".staging") == []


def _open_and_write(root: str, embedded: str, worker: int, barrier, results: str) -> None:
    """Child process: open (seeding race), add versions (numbering race), queue a job (conflict race)."""
    barrier.wait(timeout=30)
    store = ModelStore.open(root, embedded_dir=embedded, busy_timeout_s=30)
    created = [
        store.add_version("shared", dummy_writer(f"{worker}-{i}".encode()), kind="baseline").version for i in range(3)
    ]
    try:
        job = store.jobs.create(EMBEDDED_MODEL_NAME, "v1", {"worker": worker})
        job_outcome = {"created": job.id}
    except Conflict as exc:
        job_outcome = {"conflict": exc.job_id}
    Path(results, f"{worker}.json").write_text(json.dumps({"versions": created, "job": job_outcome}))


def test_concurrent_opens_and_writes_from_processes_do_not_corrupt(tmp_path: Path) -> None:
    embedded = make_model_dir(tmp_path / "embedded", b"seed")
    root, results = tmp_path / "store", tmp_path / "results"
    results.mkdir()
    workers = 4
    barrier = SPAWN.Barrier(workers)
    procs = [
        SPAWN.Process(target=_open_and_write, args=(str(root), str(embedded), i, barrier, str(results)))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * workers

    store = ModelStore(root)
    outcomes = [json.loads((results / f"{i}.json").read_text()) for i in range(workers)]
    # Seeded exactly once, before anything else.
    assert store.list_models() == [EMBEDDED_MODEL_NAME, "shared"]
    assert [v.version for v in store.list_versions(EMBEDDED_MODEL_NAME)] == ["v1"]
    # Version numbers: unique across processes and gap-free, each directory complete.
    numbered = sorted(v for o in outcomes for v in o["versions"])
    assert numbered == sorted(f"v{i}" for i in range(1, 3 * workers + 1))
    assert [v.version for v in store.list_versions("shared")] == [f"v{i}" for i in range(1, 3 * workers + 1)]
    for info in store.list_versions("shared"):
        store.verify("shared", info.version)
    assert sum(v.active for v in store.list_versions("shared")) == 1
    # One conversion per model: exactly one job created, the others pointed at it.
    created = [o["job"]["created"] for o in outcomes if "created" in o["job"]]
    assert len(created) == 1
    assert all(o["job"].get("conflict") == created[0] for o in outcomes if "conflict" in o["job"])
    assert [j.id for j in store.jobs.select()] == created
    # No leftovers, and SQLite agrees the file is sound.
    assert tree(root / ".staging") == []
    conn = sqlite3.connect(root / "store.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()


def test_an_embedded_conversion_is_seeded_as_the_active_converted_version(tmp_path: Path) -> None:
    embedded = make_model_dir(tmp_path / "embedded" / "easy-vqa-llava", b"baseline weights")
    make_model_dir(tmp_path / "embedded" / "easy-vqa-llava-eas", b"converted weights")
    store = ModelStore.open(tmp_path / "store", embedded_dir=embedded)
    active = store.active(EMBEDDED_MODEL_NAME)
    assert (active.version, active.kind, active.parent) == ("v2", "converted", (EMBEDDED_MODEL_NAME, "v1"))
    assert (active.path / "model.safetensors").read_bytes() == b"converted weights"
    assert store.baseline_of(EMBEDDED_MODEL_NAME, "v2").version == "v1"
    ModelStore.open(tmp_path / "store", embedded_dir=embedded)  # idempotent
    assert [v.version for v in store.list_versions(EMBEDDED_MODEL_NAME)] == ["v1", "v2"]
