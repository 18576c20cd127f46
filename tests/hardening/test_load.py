"""Past saturation: a real server on 127.0.0.1 with a small queue, driven by eas_tools/scripts/load_test.py (run as a
separate process, so the load generator does not share this process's GIL or memory) with 64 concurrent
clients for a bounded time and count.

It must keep answering every second of the load, refuse the excess at once with 429 and Retry-After, keep
the admitted requests' p99 within a generous multiple of the unloaded median (a bounded queue bounds the
wait; the bound is relative, never absolute), end with nothing queued, answer normally afterwards, and
its resident memory must come back near where it was before the load.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.hardening.conftest import LiveServer, metric_values, start_server
from tests.service.conftest import ModelDirs

pytestmark = pytest.mark.load

REPO = Path(__file__).resolve().parents[2]
CLIENTS = 64
LOAD_S = float(os.environ.get("EAS_LOAD_SECONDS", "8"))
QUEUE = 4
BATCH = 4
# Admitted requests wait for at most the running batch plus the queue ahead of them (QUEUE / BATCH
# batches): a few batch times, each a few single-request times. 40x the unloaded median leaves room for a
# shared, noisy 2-core machine; without the queue bound the 64 clients' wait would keep growing instead.
P99_FACTOR = 40
# RSS after the load may keep allocator arenas and cached buffers (about +7 MiB measured over ~1400
# requests); it must not keep what the load held.
RSS_SLACK_MIB = 64


@pytest.fixture(scope="module")
def saturated(model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict]]:
    with start_server(model_dirs, baseline_path=None, max_queue_size=QUEUE, max_batch_size=BATCH,
                      max_batch_wait_ms=2.0) as live:
        me = psutil.Process()
        out = tmp_path_factory.mktemp("load") / "load.json"
        command = [sys.executable, "-m", "eas_tools.scripts.load_test", "--url", live.base_url,
                   "--concurrency", str(CLIENTS), "--duration", str(LOAD_S), "--max-requests", "20000",
                   "--baseline-requests", "30", "--settle", "0", "--json-out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        gc.collect()
        rss_before = me.memory_info().rss
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peak = rss_before
        deadline = time.monotonic() + LOAD_S + 60
        while process.poll() is None:
            assert time.monotonic() < deadline, "load generator did not finish"
            peak = max(peak, me.memory_info().rss)
            time.sleep(0.1)
        assert process.returncode == 0, process.stderr.read().decode()[-3000:] if process.stderr else ""
        summary = json.loads(out.read_text())
        summary["test_rss_mib"] = {"before": rss_before / 2**20, "peak": peak / 2**20,
                                   "after": _settled_rss(me, rss_before) / 2**20}
        print(json.dumps(summary))  # the numbers docs/hardening.md quotes (visible with -s)
        yield live, summary


def _settled_rss(process: psutil.Process, before: int, settle_s: float = 5.0) -> int:
    """RSS once the load is over: give the server a moment, then take the lowest of a few samples."""
    deadline = time.monotonic() + settle_s
    lowest = process.memory_info().rss
    while time.monotonic() < deadline and lowest > before + RSS_SLACK_MIB * 2**20:
        gc.collect()
        time.sleep(0.2)
        lowest = min(lowest, process.memory_info().rss)
    return lowest


def test_it_keeps_answering_and_refuses_the_excess_with_429(saturated: tuple[LiveServer, dict]) -> None:
    _, summary = saturated
    by_status = summary["by_status"]
    assert set(by_status) <= {"200", "429"}, by_status  # no 5xx, no timeouts, no other refusals
    assert summary["errors"] == {}
    assert by_status.get("429", 0) > 0, "the load never saturated the queue"
    assert by_status["200"] >= 2 * summary["unloaded"]["requests"]
    assert summary["rejected"]["retry_after"] == {"1": by_status["429"]}  # every 429 says when to retry
    # Answers kept coming during every whole second of the load: no stall.
    whole_seconds = summary["answered_each_second"][: int(summary["load_s"])]
    assert whole_seconds and min(whole_seconds) > 0, whole_seconds
    assert summary["after_load"]["status"] == 200


def test_admitted_latency_stays_bounded(saturated: tuple[LiveServer, dict]) -> None:
    _, summary = saturated
    admitted = summary["admitted"]
    assert admitted["p99_x_unloaded"] <= P99_FACTOR, admitted
    # Refusals do not wait for the model: a typical 429 comes back faster than a typical answer.
    assert summary["rejected"]["p50_ms"] < admitted["p50_ms"], summary["rejected"]


def test_the_queue_empties_and_memory_comes_back(saturated: tuple[LiveServer, dict]) -> None:
    live, summary = saturated
    rss = summary["test_rss_mib"]
    assert rss["after"] <= rss["before"] + RSS_SLACK_MIB, rss
    with live.client() as client:
        metrics = client.get("/metrics").text
        assert client.get("/health/ready").status_code == 200
    assert [value for _, value in metric_values(metrics, "eas_queue_depth")] == [0.0]
    rejected = {labels["reason"]: value for labels, value in metric_values(metrics, "eas_requests_rejected_total")}
    assert rejected.get("queue_full") == summary["by_status"]["429"]
