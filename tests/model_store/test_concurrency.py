"""Several processes opening, seeding and writing one store at once: numbering, seeding and job conflicts stay
consistent and nothing is left half-written."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

from model_store import Conflict, ModelStore
from service.seed import EMBEDDED_MODEL_NAME, seed_embedded
from tests.model_store.helpers import dummy_writer, make_model_dir, tree

SPAWN = multiprocessing.get_context("spawn")


def _open_and_write(root: str, embedded: str, worker: int, barrier, results: str) -> None:
    """Child process: open (seeding race), add versions (numbering race), queue a job (conflict race)."""
    barrier.wait(timeout=30)
    store = ModelStore(root, busy_timeout_s=30)
    seed_embedded(store, embedded)  # what every server does when it opens its store
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
    # No leftovers, and the database agrees it is sound (PostgreSQL checks its constraints on every write).
    assert tree(root / ".staging") == []
    if store.registry_url is None:
        conn = sqlite3.connect(root / "store.sqlite3")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        finally:
            conn.close()
    else:
        assert not (root / "store.sqlite3").exists()  # the registry lives in PostgreSQL only
