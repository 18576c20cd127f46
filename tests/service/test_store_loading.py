"""Loading model-store versions the way the service does (resolve or activation, then the default loader):
every file is checked against its manifest exactly once per load, a bad version is refused before anything
is loaded, and a directory given by path is still verified by the loader."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import eas.manifest as manifest_module
from eas.manifest import MANIFEST_NAME, ModelFilesError
from model_store import ModelStore
from service.lifecycle import default_loader
from service.runner.resolve import resolve_variants, store_variants
from service.runner.runner import VariantInfo
from service.settings import Settings
from tests.model_store.helpers import make_writable
from tests.service.conftest import ModelDirs

SETTINGS = Settings(device="cpu", dtype="fp32")


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> Counter[Path]:
    """How many times each file was hashed (every checksum check goes through `sha256_file`)."""
    counts: Counter[Path] = Counter()
    real = manifest_module.sha256_file

    def counting(path: Path) -> str:
        counts[Path(path)] += 1
        return real(path)

    monkeypatch.setattr(manifest_module, "sha256_file", counting)
    return counts


@pytest.fixture
def store(tmp_path: Path, model_dirs: ModelDirs) -> ModelStore:
    """`tiny`: v1 the baseline, v2 its EAS conversion (active)."""
    store = ModelStore(tmp_path / "store")
    store.import_directory("tiny", model_dirs.baseline)
    store.import_directory("tiny", model_dirs.eas, kind="converted", parent=("tiny", "v1"), activate=True)
    return store


def _manifest_files(directory: Path) -> list[Path]:
    return [directory / rel for rel in json.loads((directory / MANIFEST_NAME).read_text())["files"]]


def _flip_last_byte(path: Path) -> None:
    make_writable(path)  # stored files are read-only
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


RESOLVERS: dict[str, Callable[[ModelStore], list[VariantInfo]]] = {
    "startup": lambda store: resolve_variants(Settings(model_store=store.root)),
    "activation": lambda store: store_variants(store, "tiny", "v2", load_baseline=True),
}


@pytest.mark.parametrize("path", sorted(RESOLVERS))
def test_a_store_version_is_hashed_once_per_load(path: str, store: ModelStore, hashed: Counter[Path]) -> None:
    infos = RESOLVERS[path](store)
    loaded = [default_loader(info, SETTINGS) for info in infos]

    assert [(i.variant, i.version) for i in infos] == [("eas", "v2"), ("baseline", "v1")]
    dirs = [store.get_version("tiny", v).path for v in ("v2", "v1")]
    assert [m.path for m in loaded] == dirs
    assert [type(m.model).__name__ for m in loaded] == ["LlavaForConditionalGeneration"] * 2
    assert loaded[0].plan is not None and loaded[0].plan.skipped == (3,) and loaded[1].plan is None
    expected = {f: 1 for d in dirs for f in _manifest_files(d)}
    assert any(f.name == "model.safetensors" for f in expected)
    assert dict(hashed) == expected  # every file, the weights included, exactly once


def test_a_directory_given_by_path_is_still_verified_once(model_dirs: ModelDirs, hashed: Counter[Path],
                                                           tmp_path: Path) -> None:
    [info] = resolve_variants(Settings(model_path=model_dirs.baseline))
    default_loader(info, SETTINGS)
    assert dict(hashed) == {f: 1 for f in _manifest_files(model_dirs.baseline)}

    broken = Path(shutil.copytree(model_dirs.baseline, tmp_path / "broken"))
    _flip_last_byte(broken / "model.safetensors")
    [info] = resolve_variants(Settings(model_path=broken))
    with pytest.raises(ModelFilesError, match=r"model\.safetensors is corrupted"):
        default_loader(info, SETTINGS)


def test_a_bad_store_version_is_refused_before_anything_loads(store: ModelStore, model_dirs: ModelDirs) -> None:
    _flip_last_byte(store.get_version("tiny", "v1").path / "model.safetensors")
    for resolve in RESOLVERS.values():  # the baseline beside a good conversion is checked too
        with pytest.raises(ModelFilesError, match=r"model\.safetensors is corrupted"):
            resolve(store)
    assert [i.version for i in store_variants(store, "tiny", load_baseline=False)] == ["v2"]

    other = store.import_directory("other", model_dirs.baseline)
    (other.path / MANIFEST_NAME).unlink()  # the loader alone would accept a directory without a manifest
    with pytest.raises(ModelFilesError, match=MANIFEST_NAME):
        store_variants(store, "other")


def test_the_decode_loop_setting_reaches_the_loaded_model(model_dirs: ModelDirs,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """EAS_DECODE_LOOP: `auto` and `eas` run the project's loop on the CPU, `transformers` runs
    `model.generate`; the answers are the same."""
    from PIL import Image

    from eas.model import decoding

    runs: list[str] = []
    real = decoding.Decoder.generate

    def counted(self, *args, **kwargs):
        runs.append("eas")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(decoding.Decoder, "generate", counted)
    [info] = resolve_variants(Settings(model_path=model_dirs.eas))
    answers = {}
    for loop in ("auto", "transformers", "eas"):
        runs.clear()
        loaded = default_loader(info, Settings(device="cpu", dtype="fp32", decode_loop=loop))
        assert loaded.decode_loop == loop
        answers[loop] = loaded.answer([Image.new("RGB", (40, 40), "red")], ["what colour is the shape?"], 6)
        assert runs == ([] if loop == "transformers" else ["eas"])
    assert answers["auto"] == answers["transformers"] == answers["eas"]
    with pytest.raises(ValueError, match="decode_loop"):
        Settings(decode_loop="fast")
