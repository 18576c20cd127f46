"""Registry reads, activation, default model and baseline lineage."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from model_store import ModelStore, NotFound, StoreError, VersionInfo
from model_store.registry import postgres_url
from tests.model_store.helpers import dummy_writer


def _three_versions(store: ModelStore, name: str = "m") -> None:
    store.add_version(name, dummy_writer(b"1"), kind="baseline")
    store.add_version(name, dummy_writer(b"2"), kind="converted", parent=(name, "v1"))
    store.add_version(name, dummy_writer(b"3"), kind="converted", parent=(name, "v2"))


def _active_versions(store: ModelStore, name: str) -> list[str]:
    return [v.version for v in store.list_versions(name) if v.active]


def test_activation_is_exclusive_and_per_model(store: ModelStore) -> None:
    _three_versions(store, "a")
    _three_versions(store, "b")
    assert _active_versions(store, "a") == ["v1"]

    info = store.activate("a", "v2")
    assert info.active and info.version == "v2"
    assert _active_versions(store, "a") == ["v2"]
    assert store.active("a").version == "v2"
    assert store.get_version("a").version == "v2"
    assert _active_versions(store, "b") == ["v1"]  # untouched

    store.activate("a", "v3")
    store.activate("a", "v3")  # idempotent
    assert _active_versions(store, "a") == ["v3"]


def test_database_itself_refuses_a_second_active_version(store: ModelStore) -> None:
    """The partial unique index, not only the code, holds the rule (on either backend): a raw UPDATE that
    would make a second version active is refused by the database."""
    _three_versions(store)
    with pytest.raises(IntegrityError), store._registry.engine.begin() as conn:
        conn.execute(text("UPDATE versions SET active = 1 WHERE model = 'm' AND version = 'v2'"))
    assert _active_versions(store, "m") == ["v1"]


def test_registry_url_is_validated_without_echoing_the_password(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="must be a PostgreSQL URL") as caught:
        ModelStore(tmp_path / "s", registry_url="mysql://user:hunter2@db/eas")
    assert "hunter2" not in str(caught.value)
    assert postgres_url("postgresql://u:p@h:5432/d") == "postgresql+psycopg://u:p@h:5432/d"


def test_a_read_only_store_reads_and_activates_but_never_writes(tmp_path: Path, registry_backend: str) -> None:
    """Serving pods mount the artefacts read-only: with PostgreSQL they still read, verify and follow (and an
    activation is a registry row, no file); adding a version is refused up front. SQLite cannot work there."""
    root = tmp_path / "store"
    writer = ModelStore(root)
    writer.add_version("m", dummy_writer(b"1"), kind="baseline")
    writer.add_version("m", dummy_writer(b"2"), kind="baseline")
    if registry_backend == "sqlite":
        with pytest.raises(StoreError, match="read-only"):
            ModelStore(root, read_only=True)
        return
    reader = ModelStore(root, read_only=True)
    assert reader.verify("m", "v2").version == "v2"
    reader.activate("m", "v2")
    assert writer.active("m").version == "v2" and reader.active_versions() == {"m": "v2"}
    with pytest.raises(StoreError, match="read-only"):
        reader.add_version("m", dummy_writer(b"3"), kind="baseline")
    assert [v.version for v in writer.list_versions("m")] == ["v1", "v2"]


def test_concurrent_activations_leave_exactly_one_active(store: ModelStore) -> None:
    _three_versions(store)
    errors: list[BaseException] = []

    def flip(version: str) -> None:
        try:
            for _ in range(15):
                store.activate("m", version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=flip, args=(v,)) for v in ("v1", "v2", "v3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(_active_versions(store, "m")) == 1


def test_unknown_names_raise_not_found_with_the_alternatives(store: ModelStore) -> None:
    _three_versions(store)
    with pytest.raises(NotFound, match=r"unknown model 'nope' \(known models: m\)"):
        store.get_version("nope")
    with pytest.raises(NotFound, match=r"model 'm' has no version 'v7' \(versions: v1, v2, v3\)"):
        store.activate("m", "v7")
    with pytest.raises(NotFound):
        store.list_versions("nope")
    with pytest.raises(NotFound):
        store.activate("nope", "v1")
    assert _active_versions(store, "m") == ["v1"]


def test_baseline_of_follows_parents_across_models(store: ModelStore) -> None:
    _three_versions(store)
    store.add_version("m-fast", dummy_writer(), kind="converted", parent=("m", "v3"))

    assert store.baseline_of("m", "v3").ref == "m:v1"
    assert store.baseline_of("m", "v2").ref == "m:v1"
    assert store.baseline_of("m", "v1").ref == "m:v1"  # a baseline is its own unskipped source
    assert store.baseline_of("m-fast", "v1").ref == "m:v1"
    assert store.get_version("m-fast", "v1").parent == ("m", "v3")
    store.activate("m", "v2")
    assert store.baseline_of("m").ref == "m:v1"  # version=None → the active one


def test_default_model_is_the_first_added_until_set(store: ModelStore) -> None:
    assert store.default_model() is None
    store.add_version("first", dummy_writer(), kind="baseline")
    store.add_version("second", dummy_writer(), kind="baseline")
    assert store.list_models() == ["first", "second"]
    assert store.default_model() == "first"
    assert store.path_for_loading() == store.get_version("first", "v1").path

    store.set_default_model("second")
    assert store.default_model() == "second"
    assert ModelStore(store.root).default_model() == "second"  # persisted
    with pytest.raises(NotFound):
        store.set_default_model("third")
    assert store.default_model() == "second"


def test_version_info_is_frozen_and_json_ready(store: ModelStore) -> None:
    store.add_version("m", dummy_writer(), kind="baseline", metadata={"accuracy": 0.9})
    info = store.add_version("m", dummy_writer(), kind="converted", parent=("m", "v1"))
    assert isinstance(info, VersionInfo)
    with pytest.raises(AttributeError):
        info.version = "v9"  # type: ignore[misc]
    data = json.loads(json.dumps(info.to_dict()))
    assert data["parent"] == ["m", "v1"] and data["kind"] == "converted" and data["active"] is False
    assert data["created_at"].endswith("Z")
    assert store.get_version("m", "v1").metadata == {"accuracy": 0.9}
