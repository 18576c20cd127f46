"""Reading metric names out of the deployment files: PromQL expressions of the rules, the dashboard and the
adapter config."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.observability.conftest import DEPLOY

RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "eas-serve.json"
ADAPTER = DEPLOY / "k8s" / "monitoring" / "prometheus-adapter-rules.yaml"

# A service metric: `eas_` then name characters; never preceded by a name character or a colon (so the
# `eas:` recording-rule names and words like `speas_x` are not taken).
METRIC = re.compile(r"(?<![A-Za-z0-9_:])eas_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def rule_expressions() -> dict[str, str]:
    """'file: record/alert name' -> expression, for every rule."""
    return {f"{path.name}: {rule.get('record') or rule.get('alert')}": rule["expr"]
            for path in RULE_FILES for rule in rules(path)}


def recorded_names() -> set[str]:
    return {rule["record"] for path in RULE_FILES for rule in rules(path) if "record" in rule}


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, child in node.items():
            yield key, child
            yield from walk(child)
    elif isinstance(node, list):
        for child in node:
            yield from walk(child)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_expressions() -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template-variable queries."""
    exprs = []
    for key, child in walk(dashboard()):
        if (key == "expr" and isinstance(child, str)) or (key == "definition" and isinstance(child, str)):
            exprs.append(child)
    return exprs


def adapter_series_queries() -> list[str]:
    config = yaml.safe_load(yaml.safe_load(ADAPTER.read_text())["data"]["config.yaml"])
    return [rule["seriesQuery"] for rule in config["rules"]]


def metric_names(expressions: list[str] | dict[str, str]) -> set[str]:
    texts = expressions.values() if isinstance(expressions, dict) else expressions
    return {base_name(m) for text in texts for m in METRIC.findall(text)}
