"""Atomic version creation and crash recovery: a version is complete and registered, or it does not exist."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from eas.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from model_store import (
    InvalidName,
    ModelFilesError,
    ModelStore,
    NotFound,
    StoreError,
    VersionWriteError,
)
from model_store import registry as registry_module
from model_store import versions as versions_module
from tests.model_store.helpers import dummy_writer, make_model_dir, tree

SPAWN = multiprocessing.get_context("spawn")


def test_versions_are_numbered_sealed_and_read_only(store: ModelStore) -> None:
    v1 = store.add_version("m", dummy_writer(b"one"), kind="baseline", metadata={"note": "first"})
    v2 = store.add_version("m", dummy_writer(b"two"), kind="converted", parent=("m", "v1"))

    assert (v1.version, v2.version) == ("v1", "v2")
    assert v1.path == store.root / "models" / "m" / "v1"
    assert (v1.path / "model.safetensors").read_bytes() == b"one"
    manifest = json.loads((v1.path / MANIFEST_NAME).read_text())["files"]
    assert set(manifest) == {"config.json", "model.safetensors", "tokenizer/vocab.txt"}
    assert verify_manifest(v2.path, require=True)
    # Immutable on disk too: files are read-only.
    mode = (v1.path / "model.safetensors").stat().st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert store.get_version("m", "v1").metadata == {"note": "first"}
    # The first version of a model becomes active; later ones do not by themselves.
    assert [(v.version, v.active) for v in store.list_versions("m")] == [("v1", True), ("v2", False)]
    assert tree(store.root / ".staging") == []


def test_enospc_in_callback_leaves_nothing(store: ModelStore) -> None:
    def disk_full(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(VersionWriteError) as info:
        store.add_version("m", disk_full, kind="baseline")

    exc = info.value
    assert isinstance(exc, OSError) and isinstance(exc, StoreError)
    assert exc.errno == errno.ENOSPC
    assert "'m'" in str(exc) and "No space left on device" in str(exc) and "no version was created" in str(exc)
    assert isinstance(exc.__cause__, OSError)
    assert tree(store.root / "models") == []
    assert tree(store.root / ".staging") == []
    assert store.list_models() == []
    with pytest.raises(NotFound):
        store.get_version("m")
    # The failed attempt consumed nothing: the next write is v1.
    assert store.add_version("m", dummy_writer(), kind="baseline").version == "v1"


def test_other_callback_errors_propagate_unchanged_and_keep_existing_versions(store: ModelStore) -> None:
    class Cancelled(Exception):
        pass

    store.add_version("m", dummy_writer(), kind="baseline")

    def cancelled(directory: Path) -> None:
        dummy_writer()(directory)
        raise Cancelled("stop")

    with pytest.raises(Cancelled) as info:
        store.add_version("m", cancelled, kind="converted", parent=("m", "v1"))
    assert any("no version was created" in note for note in info.value.__notes__)
    assert [v.version for v in store.list_versions("m")] == ["v1"]
    assert tree(store.root / "models" / "m").count("v2") == 0
    assert tree(store.root / ".staging") == []
    assert store.add_version("m", dummy_writer(), kind="converted", parent=("m", "v1")).version == "v2"


def _fail_fsync(path: Path) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fail_insert(*args: object, **kwargs: object) -> None:
    raise sqlite3.OperationalError("disk I/O error")


@pytest.mark.parametrize(
    ("target", "replacement", "expected"),
    [
        (versions_module, ("fsync_path", _fail_fsync), VersionWriteError),  # while sealing
        (registry_module, ("insert_version", _fail_insert), sqlite3.OperationalError),  # after the rename
    ],
)
def test_failures_inside_the_store_are_undone(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch, target: object, replacement: tuple, expected: type
) -> None:
    store.add_version("m", dummy_writer(), kind="baseline")
    monkeypatch.setattr(target, *replacement)

    with pytest.raises(expected):
        store.add_version("m", dummy_writer(b"new"), kind="converted", parent=("m", "v1"))

    monkeypatch.undo()
    assert [v.version for v in store.list_versions("m")] == ["v1"]
    assert sorted(p.name for p in (store.root / "models" / "m").iterdir()) == ["v1"]
    assert tree(store.root / ".staging") == []
    store.verify("m", "v1")


def _crash_inside_callback(root: str) -> None:
    """Child process: die (no cleanup, no exception handling) while writing a version."""
    store = ModelStore(root)

    def write_then_die(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"partial")
        os._exit(3)

    store.add_version("m", write_then_die, kind="converted", parent=("m", "v1"))


def _crash_after_rename(root: str) -> None:
    """Child process: die after the version directory was renamed into place, before it is registered."""
    from model_store import registry

    def die(*args: object, **kwargs: object) -> None:
        os._exit(4)

    registry.insert_version = die
    ModelStore(root).add_version("m", dummy_writer(b"orphan"), kind="converted", parent=("m", "v1"))


def _run_child(target: object, *args: object, expected_exit: int) -> None:
    proc = SPAWN.Process(target=target, args=args)
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("child process hung")
    assert proc.exitcode == expected_exit


def test_crashed_writer_staging_is_removed_on_reopen(store: ModelStore) -> None:
    store.add_version("m", dummy_writer(), kind="baseline")

    _run_child(_crash_inside_callback, str(store.root), expected_exit=3)

    leftovers = tree(store.root / ".staging")
    assert any(name.endswith(".lock") for name in leftovers)
    assert any(name.endswith("model.safetensors") for name in leftovers)
    reopened = ModelStore(store.root)
    assert tree(store.root / ".staging") == []
    assert [v.version for v in reopened.list_versions("m")] == ["v1"]


def test_live_writers_staging_survives_another_open(store: ModelStore) -> None:
    """Opening the store while another writer is mid-write must not delete that writer's files."""

    def write_while_someone_opens(directory: Path) -> None:
        dummy_writer()(directory)
        ModelStore(store.root)  # another "process" opening the store and running its cleanup
        assert (directory / "model.safetensors").is_file()

    info = store.add_version("m", write_while_someone_opens, kind="baseline")
    store.verify("m", info.version)


def test_unregistered_version_directory_is_never_listed_and_is_removed_on_reopen(store: ModelStore) -> None:
    store.add_version("m", dummy_writer(), kind="baseline")

    _run_child(_crash_after_rename, str(store.root), expected_exit=4)

    orphan = store.root / "models" / "m" / "v2"
    assert (orphan / "model.safetensors").read_bytes() == b"orphan"  # renamed in, never registered
    assert [v.version for v in store.list_versions("m")] == ["v1"]
    with pytest.raises(NotFound):
        store.get_version("m", "v2")
    # A writer that has not reopened yet allocates above the leftover instead of landing on it.
    assert store.add_version("m", dummy_writer(), kind="converted", parent=("m", "v1")).version == "v3"

    report = store.recover()  # what every open runs
    assert report["orphans"] == ["m/v2"]
    assert len(report["staging"]) == 1  # the dead writer's lock file (its directory had been renamed)
    assert not orphan.exists()
    assert tree(store.root / ".staging") == []
    assert [v.version for v in store.list_versions("m")] == ["v1", "v3"]


def test_import_directory_copies_and_checks_the_source_manifest(store: ModelStore, tmp_path: Path) -> None:
    src = make_model_dir(tmp_path / "src", b"source weights")
    info = store.import_directory("imported", src, metadata={"origin": "test"})
    assert (info.path / "model.safetensors").read_bytes() == b"source weights"
    assert (src / "model.safetensors").exists()  # copied, not moved
    store.verify("imported", "v1")

    # A source whose files no longer match its own manifest is refused, naming the file.
    bad = make_model_dir(tmp_path / "bad", b"good bytes")
    write_manifest(bad)
    (bad / "model.safetensors").write_bytes(b"evil bytes")
    with pytest.raises(ModelFilesError, match=r"model\.safetensors"):
        store.import_directory("imported", bad)
    assert [v.version for v in store.list_versions("imported")] == ["v1"]
    assert tree(store.root / ".staging") == []


def test_import_if_empty_imports_only_the_first_model(store: ModelStore, tmp_path: Path) -> None:
    src = make_model_dir(tmp_path / "src", b"first weights")
    with pytest.raises(NotFound, match="not a directory"):
        store.import_if_empty("first", tmp_path / "missing")
    info = store.import_if_empty("first", src, metadata={"origin": "test"})
    assert info is not None and (info.ref, info.kind, info.active, info.parent) == ("first:v1", "baseline", True, None)
    assert info.metadata == {"origin": "test"} and (info.path / "model.safetensors").read_bytes() == b"first weights"
    assert store.import_if_empty("first", src) is None  # the store holds a model now: nothing is copied
    assert store.import_if_empty("second", src) is None
    assert store.list_models() == ["first"] and [v.version for v in store.list_versions("first")] == ["v1"]
    assert tree(store.root / ".staging") == []


def test_import_if_empty_rechecks_under_the_write_lock(store: ModelStore, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process adds a model while this one is still copying: the copy is discarded, not published."""
    import model_store.store as store_module

    real_copy = store_module._copy_verified

    def copy_while_another_writer_wins(src: Path, dst: Path) -> None:
        real_copy(src, dst)
        ModelStore(store.root).add_version("winner", dummy_writer(), kind="baseline")

    monkeypatch.setattr(store_module, "_copy_verified", copy_while_another_writer_wins)
    assert store.import_if_empty("late", make_model_dir(tmp_path / "src")) is None
    assert store.list_models() == ["winner"]
    assert tree(store.root / "models" / "late") == [] and tree(store.root / ".staging") == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": "../escape", "kind": "baseline"}, InvalidName),
        ({"name": ".hidden", "kind": "baseline"}, InvalidName),
        ({"name": "a/b", "kind": "baseline"}, InvalidName),
        ({"name": "m", "kind": "sparse"}, ValueError),
        ({"name": "m", "kind": "converted"}, ValueError),  # converted needs a parent
        ({"name": "m", "kind": "baseline", "parent": ("m", "v1")}, ValueError),
        ({"name": "m", "kind": "converted", "parent": ("m", "v9")}, NotFound),
        ({"name": "m", "kind": "baseline", "metadata": {"x": object()}}, ValueError),
    ],
)
def test_invalid_requests_are_refused_before_writing(store: ModelStore, kwargs: dict, error: type) -> None:
    store.add_version("m", dummy_writer(), kind="baseline")
    called = []

    with pytest.raises(error):
        store.add_version(write=lambda d: called.append(d), **kwargs)
    assert called == []
    assert [v.version for v in store.list_versions("m")] == ["v1"]


def test_conversion_source_is_the_baseline_when_the_active_version_is_a_conversion(store: ModelStore) -> None:
    """Converting a model that serves a conversion converts its original again, unless a version is named."""
    store.add_version("m", dummy_writer(b"base"), kind="baseline")
    assert store.conversion_source("m").version == "v1"  # a baseline is its own source
    store.add_version("m", dummy_writer(b"eas"), kind="converted", parent=("m", "v1"), activate=True)
    assert store.active("m").version == "v2"
    assert store.conversion_source("m").version == "v1"
    assert store.conversion_source("m", "v2").version == "v2"  # named: as is, for the caller to refuse
