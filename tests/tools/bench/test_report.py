"""The typed bench report reads the documents `eas bench` wrote before it was typed (docs/results/) and writes
them back unchanged; what cannot be measured is NaN in memory and null in JSON."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from eas_tools.bench.report import BenchReport, Flops, FlopsUnavailable, latency_points, summary

RESULTS = sorted((Path(__file__).resolve().parents[3] / "docs" / "results").glob("bench-*.json"))


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(RESULTS[0].read_text())


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_published_reports_read_back_to_the_same_document(path: Path) -> None:
    data = json.loads(path.read_text())
    report = BenchReport.read(path)
    assert report.to_json() == data
    assert isinstance(report.flops, Flops) and report.flops.baseline.total == data["flops"]["baseline"]["total"]
    assert report.acceptance.of("1").http_speedup == data["acceptance"]["batch_1"]["http_speedup"]
    text = summary(report)
    assert f"ratio {data['flops']['ratio']['total']:.3f}×" in text and "## acceptance" in text
    assert len(latency_points(report)) == (len(data["sweep"]) or 2)


def test_a_missing_section_is_refused_naming_it(document: dict[str, Any]) -> None:
    broken = copy.deepcopy(document)
    del broken["batches"]["1"]["memory_ratio"]
    with pytest.raises(ValidationError, match="memory_ratio"):
        BenchReport.from_json(broken)


def test_unmeasurable_figures_are_nan_in_memory_and_null_in_json(document: dict[str, Any]) -> None:
    data = copy.deepcopy(document)
    data["batches"]["1"]["raw_speedup"]["vision_s"] = None  # e.g. a model whose vision phase took no time
    data["throughput"][0]["speedup"] = None
    report = BenchReport.from_json(data)
    assert math.isnan(report.batches["1"].raw_speedup["vision_s"]) and math.isnan(report.throughput[0].speedup)
    assert report.to_json() == data
    json.dumps(report.to_json(), allow_nan=False)  # strict JSON
    assert "| vision tower + projector |" in summary(report)


def test_a_model_without_a_flop_count_reads_and_summarises(document: dict[str, Any]) -> None:
    data = copy.deepcopy(document)
    data["flops"] = {"unavailable": "FLOPs are counted for LLaVA-style configs only"}
    data["acceptance"]["flop_ratio"] = None
    for key in data["batches"]:
        data["acceptance"][f"batch_{key}"]["http_speedup_ge_flop_ratio"] = None
    report = BenchReport.from_json(data)
    assert isinstance(report.flops, FlopsUnavailable)
    assert report.to_json() == data
    text = summary(report)
    assert "FLOPs: FLOPs are counted for LLaVA-style configs only" in text and "≥ FLOP ratio n/a" in text
