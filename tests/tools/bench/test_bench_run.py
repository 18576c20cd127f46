"""`eas bench` end to end on the tiny geometry in --quick mode: the real service on loopback, both variants,
JSON and plots written; and the command line's refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eas_tools.bench.report import JSON_NAME, LATENCY_PLOT, SUMMARY_NAME, THROUGHPUT_PLOT, BenchReport, Flops
from eas_tools.bench.run import resolve_options, run_bench
from eas_tools.cli import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchReport, Path]:
    out = tmp_path_factory.mktemp("bench")
    options = resolve_options(out, quick=True, geometry="tiny", sweep=True, progress=False,
                              command=["eas", "bench", "--quick"])
    # As `eas bench` runs for a user on a CPU, where the service's default puts each model in a process of
    # its own (the suite turns that off): the bench must still time the served models in-process.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EAS_MODEL_PROCESS", "true")
        return run_bench(options, log=lambda _msg: None), out


def test_writes_valid_json_summary_and_plots(quick_run: tuple[BenchReport, Path]) -> None:
    _, out = quick_run
    data = json.loads((out / JSON_NAME).read_text())  # strict JSON: no NaN
    assert data["schema"] == "eas-bench/1"
    assert data["command"] == ["eas", "bench", "--quick"]
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    for name in (LATENCY_PLOT, THROUGHPUT_PLOT):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "## acceptance" in (out / SUMMARY_NAME).read_text()
    assert set(data["batches"]) == {"1", "2"}


def test_measures_both_variants_on_every_path(quick_run: tuple[BenchReport, Path]) -> None:
    report, _ = quick_run
    assert report.models.eas.skipped == [2, 3]  # 50% of 4 layers, deepest, layer 0 kept
    assert report.models.baseline.skipped == []
    for batch in report.batches.values():
        for variant in ("baseline", "eas"):
            raw = batch.raw.of(variant)
            assert raw.new_tokens == [4]  # random weights never stop early: every run decodes 4 tokens
            assert len(raw.samples_s["e2e_s"]) == (2 if batch.batch_size == 1 else 1)
            assert all(v > 0 for v in raw.median_s.values())
            assert batch.http.of(variant).median_s["e2e_s"] > 0
            assert math.isfinite(batch.overhead.of(variant).http_minus_raw_p50_s)
        # KV cache: exactly the kept fraction (2 of 4 layers) of the baseline's
        assert batch.memory_ratio.kv_cache_bytes == 2.0
        assert batch.memory.eas.weight_bytes < batch.memory.baseline.weight_bytes
    mean_batch = report.batches["2"].http.eas.mean_server_batch_size
    assert mean_batch is not None and mean_batch >= 1.0
    assert isinstance(report.flops, Flops) and report.flops.ratio.total > 1.0
    assert [row.clients for row in report.throughput] == [1, 2, 4]
    assert all(row.baseline.requests_per_s > 0 and row.eas.requests_per_s > 0 for row in report.throughput)


def test_interleaving_alternates_variants_and_paths(quick_run: tuple[BenchReport, Path]) -> None:
    order = quick_run[0].batches["1"].order
    assert order == ["baseline:raw", "baseline:http", "eas:raw", "eas:http",
                     "eas:http", "eas:raw", "baseline:http", "baseline:raw"]
    assert [row.order for row in quick_run[0].throughput] == [
        ["baseline", "eas"], ["eas", "baseline"], ["baseline", "eas"]]


def test_sweep_includes_the_unskipped_conversion_as_a_control(quick_run: tuple[BenchReport, Path]) -> None:
    sweep = quick_run[0].sweep
    assert [p.skipped for p in sweep] == [[], [2, 3]]
    assert sweep[0].flop_ratio == 1.0 and sweep[1].flop_ratio > 1.0


def test_each_phase_is_reported_beside_its_bound(quick_run: tuple[BenchReport, Path]) -> None:
    """Prefill against its FLOP ratio, a decode step against its ratio of bytes read (issue 18 item 5)."""
    report, out = quick_run
    bounds = report.bounds
    assert bounds is not None and isinstance(report.flops, Flops)
    assert bounds.prefill_flop_ratio == report.flops.ratio.prefill
    assert bounds.decode_per_token_speedup == report.batches["1"].paired.raw["decode_per_token_s"]
    per_step = bounds.decode_bytes
    assert (per_step.baseline.attention_layers, per_step.eas.attention_layers) == (4, 2)
    assert per_step.baseline.kv_cache == 2 * per_step.eas.kv_cache
    assert bounds.decode_bytes_ratio == per_step.baseline.per_step / per_step.eas.per_step > 1.0
    sweep = report.sweep
    # the unskipped conversion removes nothing; its kept layers' folded q/k/v biases are a few bytes more
    assert 0.99 < sweep[0].decode_bytes_ratio < 1.0 and sweep[0].prefill_flop_ratio == 1.0
    assert sweep[1].decode_bytes_ratio == pytest.approx(bounds.decode_bytes_ratio)
    assert "speed-up against each phase's bound" in (out / SUMMARY_NAME).read_text()


def test_acceptance_is_reported_per_batch_size(quick_run: tuple[BenchReport, Path]) -> None:
    report = quick_run[0]
    acceptance = report.acceptance
    assert isinstance(report.flops, Flops) and acceptance.flop_ratio == report.flops.ratio.total
    for key in ("1", "2"):
        assert isinstance(acceptance.of(key).http_speedup_ge_flop_ratio, bool)
        assert isinstance(acceptance.of(key).http_speedup_ge_95pct_raw, bool)


def test_the_written_json_is_the_report_and_reads_back(quick_run: tuple[BenchReport, Path]) -> None:
    """bench.json is `to_json()` of the returned report (the acceptance flattened to batch_<size> keys, as
    before the report was typed) and `BenchReport.read` turns it back into the same document."""
    report, out = quick_run
    data = json.loads((out / JSON_NAME).read_text())
    assert data == report.to_json()
    assert set(data["acceptance"]) == {"flop_ratio", "min_fraction_of_raw", "batch_1", "batch_2"}
    assert "server_median_s" in data["batches"]["1"]["http"]["eas"]  # measured at batch 1 only
    assert "server_median_s" not in data["batches"]["2"]["http"]["eas"]
    assert BenchReport.read(out / JSON_NAME).to_json() == data


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_the_7b_geometry_is_refused_on_cpu(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--geometry", "llava-1.5-7b", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "GPU" in result.output and "--allow-large-on-cpu" in result.output
    assert not (tmp_path / "b").exists()  # refused before anything was built or written


@pytest.mark.parametrize("args, message", [
    (["--geometry", "huge"], "unknown geometry"),
    (["--skip-count", "4", "--geometry", "tiny"], "layer 0"),
    (["--eas-dir", "x"], "go together"),
    (["--store", "s"], "--model"),
    (["--device", "tpu"], "choose auto, cpu or cuda"),
])
def test_bad_options_are_one_message(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "b"), *args])
    assert result.exit_code == 2
    assert message in result.output
