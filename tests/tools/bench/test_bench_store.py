"""`eas bench --store`: a converted store version against its unskipped parent, loaded from the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from eas.zoo.llava import TINY
from eas_tools.bench.run import resolve_options, run_bench
from eas_tools.bench.skips import bench_plan
from eas_tools.bench.variants import BenchSetupError, build_random, convert_and_save, save_plain, store_pair
from eas_tools.cli import app
from model_store import ModelStore


@pytest.fixture
def store_with_conversion(tmp_path: Path) -> Path:
    model, processor = build_random(TINY, seed=3)
    source = save_plain(model, processor, tmp_path / "src")
    store = ModelStore(tmp_path / "store")
    parent = store.import_directory("tiny", source, kind="baseline", activate=True)
    store.add_version("tiny", lambda d: convert_and_save(model, processor, bench_plan(4, count=1), d),
                      kind="converted", parent=(parent.name, parent.version), activate=True)
    return tmp_path / "store"


def test_store_pair_is_the_active_conversion_and_its_parent(store_with_conversion: Path) -> None:
    dirs = store_pair(store_with_conversion, "tiny")
    assert dirs.source == "store:tiny:v2"
    assert dirs.eas.name == "v2" and dirs.baseline.name == "v1"
    with pytest.raises(BenchSetupError, match="baseline version"):
        store_pair(store_with_conversion, "tiny", "v1")
    with pytest.raises(BenchSetupError, match="model store"):
        store_pair(store_with_conversion, "nope")


def test_bench_runs_on_a_store_version(store_with_conversion: Path, tmp_path: Path) -> None:
    options = resolve_options(tmp_path / "out", quick=True, store=store_with_conversion, model="tiny",
                              batch_size=1, concurrency=(1,), progress=False)
    report = run_bench(options, log=lambda _msg: None)
    assert report.models.source == "store:tiny:v2"
    assert report.models.eas.skipped == [3]
    assert set(report.batches) == {"1"}
    assert report.batches["1"].memory_ratio.kv_cache_bytes == pytest.approx(4 / 3)


def test_missing_store_model_is_one_message(store_with_conversion: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--store", str(store_with_conversion), "--model", "nope",
                                      "--out", str(tmp_path / "b"), "--no-progress"])
    assert result.exit_code == 2
    assert "model store" in result.output
