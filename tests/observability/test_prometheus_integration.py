"""Acceptance: a real Prometheus (the Debian `prometheus` binary) scrapes a real uvicorn serving two tiny
models as `eas` and `baseline`, evaluates the repository's recording rules, and answers through its HTTP
API with per-variant p50 latencies and the speedup ratio.

Loopback only, a temporary data directory, 1 s scrape and evaluation intervals, bounded to about a minute;
the Prometheus process is killed at the end. Skipped only when the binary is not installed (`.ci/run`
installs it when running as root).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.app import create_app
from tests.observability.promql import RULE_FILES
from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, uvicorn_thread

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="the `prometheus` binary is not installed "
                       "(apt-get install prometheus; .ci/run installs it when running as root)"),
]

BUDGET_S = 60.0
Q = "what colour is the shape?"
COLORS = [(200, 30, 30), (30, 160, 40), (40, 40, 200), (220, 200, 40)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    """Prometheus on 127.0.0.1 scraping `target` every second with the repository's rules; yields its URL."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(path) for path in RULE_FILES],
        "scrape_configs": [{"job_name": "eas-serve", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [target]}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "prometheus.log"
    assert PROMETHEUS is not None
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        with httpx.Client(trust_env=False, timeout=2) as client:
            while True:
                assert process.poll() is None, f"prometheus exited: {log_path.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"prometheus not ready: {log_path.read_text()[-2000:]}"
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{url}/-/ready").status_code == 200:
                        break
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def query(client: httpx.Client, url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    response = client.get(f"{url}/api/v1/query", params=params)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def finite_by_variant(result: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for series in result:
        number = float(series["value"][1])
        if math.isfinite(number):
            out[series["metric"].get("variant", "")] = number
    return out


class Traffic:
    """Requests to both variants, alternating, from a background thread until stopped."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.sent = {"eas": 0, "baseline": 0}
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, trust_env=False, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                variant = ("eas", "baseline")[i % 2]
                response = client.post("/v1/answer", **multipart(image_bytes(COLORS[i % len(COLORS)]), Q,
                                                                   variant=variant, max_new_tokens="4"))
                if response.status_code == 200:
                    self.sent[variant] += 1
                else:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                i += 1
                time.sleep(0.02)  # a steady trickle, not a benchmark: the machine is shared

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_prometheus_records_per_variant_latency_and_speedup(model_dirs: ModelDirs, tmp_path: Path) -> None:
    started = time.monotonic()
    app = create_app(make_settings(model_dirs, shadow_fraction=0.25))
    with uvicorn_thread(app) as (base_url, _server), Traffic(base_url) as traffic:
        target = base_url.removeprefix("http://")
        with prometheus(tmp_path, target) as url, httpx.Client(trust_env=False, timeout=5) as client:
            found: dict[str, Any] = {}
            while time.monotonic() - started < BUDGET_S:
                # One instant, 1.5 s back, for all three: one evaluation round, completely written.
                at = time.time() - 1.5
                request_p50 = finite_by_variant(query(client, url, "eas:request_duration_seconds:p50_5m", at))
                model_p50 = finite_by_variant(query(client, url, "eas:inference_duration_seconds:p50_5m", at))
                speedup = [float(s["value"][1]) for s in query(client, url, "eas:inference_speedup:p50_5m", at)]
                if {"eas", "baseline"} <= set(request_p50) and {"eas", "baseline"} <= set(model_p50) \
                        and speedup and all(math.isfinite(x) for x in speedup):
                    found = {"request_p50": request_p50, "model_p50": model_p50, "speedup": speedup[0]}
                    break
                time.sleep(0.5)
            up = query(client, url, 'up{job="eas-serve"}')
            shadow = query(client, url, "sum(eas_shadow_requests_total)")
    elapsed = time.monotonic() - started
    assert not traffic.failures, traffic.failures[:3]
    assert up and float(up[0]["value"][1]) == 1.0
    assert found, f"no recording-rule values within {BUDGET_S} s (sent {traffic.sent})"
    for name in ("request_p50", "model_p50"):
        for variant, seconds in found[name].items():
            assert 0 < seconds < 30, (name, variant, seconds)
    # The ratio is the two p50s divided, as the rule says (read at one instant: one evaluation round).
    model = found["model_p50"]
    assert found["speedup"] == pytest.approx(model["baseline"] / model["eas"], rel=1e-9)
    assert found["speedup"] > 0
    assert shadow and float(shadow[0]["value"][1]) >= 0
    print(f"\nprometheus: {elapsed:.1f} s, sent {traffic.sent}; request p50 {found['request_p50']}, "
          f"model p50 {found['model_p50']}, speedup (baseline/eas, p50 model time) {found['speedup']:.3f}")
