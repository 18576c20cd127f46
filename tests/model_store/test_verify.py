"""Checksum verification: a corrupted version is refused with a message naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from eas.manifest import MANIFEST_NAME
from model_store import ModelFilesError, ModelStore
from tests.model_store.helpers import dummy_writer, make_writable


def _flip_byte(path: Path, offset: int = 0) -> None:
    make_writable(path)  # stored files are read-only
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_version_is_refused_while_another_still_verifies(store: ModelStore) -> None:
    store.add_version("m", dummy_writer(b"weights of v1"), kind="baseline")
    good = store.add_version("m", dummy_writer(b"weights of v2"), kind="converted", parent=("m", "v1"))
    _flip_byte(store.get_version("m", "v1").path / "model.safetensors", offset=3)

    with pytest.raises(ModelFilesError, match=r"model\.safetensors is corrupted"):
        store.verify("m", "v1")
    with pytest.raises(ModelFilesError, match=r"model\.safetensors"):
        store.path_for_loading("m")  # v1 is the active version
    with pytest.raises(ModelFilesError, match=r"model\.safetensors"):
        store.activate("m", "v1", verify=True)

    assert store.verify("m", "v2") == good
    assert store.path_for_loading("m", "v2") == good.path
    # Corruption is not a registry change: v1 is still listed (and still active) for operators to repair.
    assert [v.version for v in store.list_versions("m")] == ["v1", "v2"]


def test_missing_file_and_missing_manifest_are_named(store: ModelStore) -> None:
    info = store.add_version("m", dummy_writer(), kind="baseline")
    (info.path / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(ModelFilesError, match=r"tokenizer/vocab\.txt is missing"):
        store.verify("m")

    other = store.add_version("other", dummy_writer(), kind="baseline")
    (other.path / MANIFEST_NAME).unlink()
    with pytest.raises(ModelFilesError, match=MANIFEST_NAME):
        store.path_for_loading("other")
    with pytest.raises(ModelFilesError, match=MANIFEST_NAME):
        store.verify("other")  # load_model alone would accept a directory without a manifest
