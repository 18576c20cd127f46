"""eas_tools/scripts/serving_overhead.py's throughput part against a separate server process (tiny model, loopback,
a handful of requests): the server comes up, answers match unbatched ones, batch sizes are scraped."""

from __future__ import annotations

from pathlib import Path

import pytest

from eas.model.loading import load_model


def _script():
    from eas_tools.scripts import serving_overhead

    return serving_overhead


def test_throughput_against_a_server_process(tiny_model_dir: Path) -> None:
    bench = _script()
    env = {"EAS_MODEL_PATH": str(tiny_model_dir), "EAS_LOAD_BASELINE": "false", "EAS_DEVICE": "cpu",
           "EAS_MAX_BATCH_WAIT_MS": "20", "EAS_MAX_BATCH_SIZE": "8"}
    samples = bench.load_samples(12)
    direct = load_model(tiny_model_dir, device="cpu")
    with bench.server_process(env, ready_timeout_s=120) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        report = bench.measure_throughput(direct, base_url, samples, concurrency=4, max_new_tokens=4)
    assert report["sequential_answers_equal_unbatched"] == report["concurrent_answers_equal_unbatched"] == 12
    assert report["mean_batch_size_sequential"] == pytest.approx(1.0)
    assert report["mean_batch_size_concurrent"] > 1.0  # the 20 ms window did gather concurrent requests


def test_a_server_that_cannot_start_is_reported(tiny_model_dir: Path) -> None:
    bench = _script()
    bad = {"EAS_MODEL_PATH": str(tiny_model_dir), "EAS_MAX_BATCH_SIZE": "0"}  # refused by the settings
    with pytest.raises(RuntimeError, match="exited"), bench.server_process(bad, ready_timeout_s=60):
        pass
