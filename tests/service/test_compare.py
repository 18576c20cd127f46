"""`eas compare` against a real loopback server: interleaved requests to both variants, server-side timings,
answer agreement, and one-line errors when the comparison cannot be made."""

from __future__ import annotations

import socket
import subprocess
import sys
from contextlib import AbstractContextManager

import pytest

from eas_tools.bench.compare import CompareError, compare, easy_vqa_questions, render
from service.app import create_app
from service.server import DrainingServer, background_server
from service.settings import Settings
from tests.service.conftest import ModelDirs, make_settings


def _serve(settings: Settings) -> AbstractContextManager[tuple[str, DrainingServer]]:
    return background_server(create_app(settings))


def test_same_model_under_both_names_agrees_and_reports_both_variants(model_dirs: ModelDirs) -> None:
    settings = make_settings(model_dirs, baseline_path=model_dirs.eas)
    questions = easy_vqa_questions(6, seed=0)
    with _serve(settings) as (url, _server):
        report = compare(url, questions, warmup=1, progress=False)
    assert [v.variant for v in report.variants] == ["eas", "baseline"]
    assert report.requests == 6
    assert report.agreement == 1.0  # one model answers itself
    assert report.disagreements == []
    for stats in report.variants:
        assert 0 < stats.inference_ms_p50 <= stats.total_ms_p50 <= stats.round_trip_ms_p50
        assert stats.accuracy is not None and 0.0 <= stats.accuracy <= 1.0
    assert report.speedup_inference_paired_median > 0
    text = render(report)
    assert "speed-up (baseline / eas)" in text and "answer agreement: 100.0% of 6" in text


def test_different_models_disagree(model_dirs: ModelDirs) -> None:
    """Negative control for the agreement figure: two differently seeded random models."""
    questions = easy_vqa_questions(8, seed=1)
    with _serve(make_settings(model_dirs)) as (url, _server):
        report = compare(url, questions, warmup=0, progress=False)
    assert report.agreement < 1.0
    assert report.disagreements and set(report.disagreements[0]) == {"question", "eas", "baseline"}


def test_one_variant_only_is_a_clear_error(model_dirs: ModelDirs) -> None:
    settings = make_settings(model_dirs, baseline_path=None)
    with _serve(settings) as (url, _server), pytest.raises(CompareError, match="not \\['baseline'\\]"):
        compare(url, easy_vqa_questions(2, seed=0), warmup=0, progress=False)


def test_cli_unreachable_server_is_one_line_exit_2() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", "from eas_tools.cli import app; app()", "compare", "--url", f"http://127.0.0.1:{port}",
         "--requests", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot talk to"), done.stderr
