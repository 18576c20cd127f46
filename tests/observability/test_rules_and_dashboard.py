"""The Prometheus rules and config pass promtool (syntax, and unit tests with known answers), the
Kubernetes PrometheusRule and the dashboard JSON match their sources, and the dashboard follows the
conventions (fixed uid, datasource variable, model/variant filters, $__rate_interval)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.observability.conftest import DEPLOY, REPO
from tests.observability.promql import RULE_FILES as RULE_FILES_ON_DISK
from tests.observability.promql import (
    dashboard,
    dashboard_expressions,
    recorded_names,
    rule_expressions,
    walk,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: it comes with the Debian `prometheus` package "
                             "(apt-get install prometheus; .ci/run installs it when running as root)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=REPO)


@needs_promtool
def test_promtool_checks_rules() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES_ON_DISK))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_config() -> None:
    result = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_rules() -> None:
    """Speedup, error ratio and alerts on synthetic series (deploy/prometheus/tests/rules_test.yml)."""
    result = promtool("test", "rules", str(DEPLOY / "prometheus" / "tests" / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_the_kubernetes_rules() -> None:
    spec = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())["spec"]
    result = subprocess.run([PROMTOOL, "check", "rules", "/dev/stdin"], input=yaml.safe_dump(spec),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_names_and_conventions() -> None:
    for name in recorded_names():
        assert re.fullmatch(r"eas:[a-z0-9_]+:[a-z0-9_]+", name), f"{name}: level:metric:operation"
    for required in ("eas:request_duration_seconds:p50_5m", "eas:request_duration_seconds:p95_5m",
                     "eas:request_duration_seconds:p99_5m", "eas:inference_speedup:p50_5m",
                     "eas:shadow_inference_speedup:p50_5m"):
        assert required in recorded_names()
    alerts = {r["alert"] for path in RULE_FILES_ON_DISK for group in yaml.safe_load(path.read_text())["groups"]
              for r in group["rules"] if "alert" in r}
    assert {"EasHighErrorRate", "EasQueueSaturated", "EasSpeedupLost"} <= alerts


def test_every_recording_rule_used_is_defined() -> None:
    used = {m for expr in [*rule_expressions().values(), *dashboard_expressions()]
            for m in re.findall(r"eas:[a-z0-9_:]+", expr)}
    assert used - recorded_names() == set()


def test_kubernetes_prometheusrule_matches_the_rule_files() -> None:
    from deploy.prometheus.build_prometheusrule import OUT, RULE_FILES, render

    assert OUT.read_text() == render(), "run: python deploy/prometheus/build_prometheusrule.py"
    assert sorted(RULE_FILES) == sorted(RULE_FILES_ON_DISK)  # a new rules file must be added there too
    groups = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert yaml.safe_load(OUT.read_text())["spec"]["groups"] == groups


def test_dashboard_json_is_generated_from_its_script() -> None:
    from deploy.grafana.build_dashboard import OUT, render

    assert OUT.read_text() == render(), "run: python deploy/grafana/build_dashboard.py"


def test_dashboard_conventions() -> None:
    board = dashboard()
    assert board["uid"] == "eas-serve-overview"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"model", "variant"} <= set(variables)
    # Every datasource reference goes through the variable: no hard-coded uid anywhere.
    refs = [child for key, child in walk(board) if key == "datasource"]
    assert refs and all(ref == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for ref in refs)
    exprs = dashboard_expressions()
    windows = {w for expr in exprs for w in re.findall(r"\[([^\]]+)\]", expr)}
    assert windows <= {"$__rate_interval", "6h"}, windows  # 6h: conversions are rare events
    assert sum("$__rate_interval" in e for e in exprs) >= 20
    per_variant = [e for e in exprs if "eas_request_duration_seconds" in e or "eas_queue_depth" in e]
    assert per_variant and all('model=~"$model"' in e for e in per_variant)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("latency", "speedup", "shadow", "throughput", "queue depth", "queue wait", "batch size",
                  "rejections", "phase", "conversion"):
        assert topic in titles, topic


def test_dashboard_is_valid_json_with_grid_positions() -> None:
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "eas-serve.json").read_text())
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


def test_generators_run_as_scripts(tmp_path) -> None:
    """`python deploy/.../build_*.py` works from the repository root (as the docs say)."""
    for script in ("deploy/grafana/build_dashboard.py", "deploy/prometheus/build_prometheusrule.py"):
        code = ("import runpy, pathlib, sys; mod = runpy.run_path(sys.argv[1]); "
                "print(len(mod['render']()))")
        result = subprocess.run([sys.executable, "-c", code, script], capture_output=True, text=True,
                                cwd=REPO, timeout=60)
        assert result.returncode == 0 and int(result.stdout) > 1000, result.stderr
