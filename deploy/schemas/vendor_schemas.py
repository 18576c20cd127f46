"""Writes the JSON schemas the deployment tests validate every manifest against, offline
(tests/observability/test_deploy_manifests.py). Run it only to move to new Kubernetes or Operator versions:

    pip install kubernetes-validate==1.37.0      # ships Kubernetes' own OpenAPI schemas, strict variant
    python deploy/schemas/vendor_schemas.py --crds <prometheus-operator checkout>/example/prometheus-operator-crd

- `kubernetes-<version>.json`: for each kind the manifests use, Kubernetes' strict schema (unknown fields
  refused) with only the definitions it reaches, references rewritten to `#/$defs/...`.
- `monitoring.coreos.com-v1.json`: the `openAPIV3Schema` of the Prometheus Operator's ServiceMonitor and
  PrometheusRule CRDs (served version v1), made strict the way `kubectl apply --validate=strict` is: an object
  schema that lists properties and neither allows additional ones nor preserves unknown fields refuses fields
  it does not know.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
K8S_VERSIONS = ("1.30.0", "1.37.0")
# (apiVersion, kind) -> the file name kubernetes-validate gives its schema
KINDS = {
    ("v1", "Namespace"): "namespace-v1.json",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("apps/v1", "Deployment"): "deployment-apps-v1.json",
    ("apps/v1", "StatefulSet"): "statefulset-apps-v1.json",
    ("batch/v1", "Job"): "job-batch-v1.json",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscaler-autoscaling-v2.json",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudget-policy-v1.json",
}
CRDS = {"ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
        "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}
# A kind's file points into _definitions.json, which points into itself.
_REF_PREFIXES = ("/api/_definitions.json#/$defs/", "#/$defs/")


def _rewrite(node: Any, found: set[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_REF_PREFIXES):
                name = value.split("#/$defs/", 1)[1]
                found.add(name)
                out[key] = f"#/$defs/{name}"
            elif key in ("$id", "$schema"):
                continue
            else:
                out[key] = _rewrite(value, found)
        return out
    if isinstance(node, list):
        return [_rewrite(v, found) for v in node]
    return node


def kubernetes_bundle(version: str) -> dict[str, Any]:
    from importlib.resources import files

    root = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    all_defs = json.loads((root / "_definitions.json").read_text())["$defs"]
    kinds: dict[str, Any] = {}
    pending: set[str] = set()
    for (api_version, kind), filename in KINDS.items():
        kinds[f"{api_version}/{kind}"] = _rewrite(json.loads((root / filename).read_text()), pending)
    defs: dict[str, Any] = {}
    while pending:
        name = pending.pop()
        if name not in defs:
            found: set[str] = set()
            defs[name] = _rewrite(all_defs[name], found)
            pending |= found - set(defs)
    return {"kubernetes": version, "kinds": kinds, "$defs": dict(sorted(defs.items()))}


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def crd_bundle(crd_dir: Path) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    versions = set()
    for kind, filename in CRDS.items():
        crd = yaml.safe_load((crd_dir / filename).read_text())
        versions.add(crd["metadata"].get("annotations", {}).get("operator.prometheus.io/version"))
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        kinds[f"monitoring.coreos.com/v1/{kind}"] = _strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    return {"prometheus-operator": sorted(v for v in versions if v), "kinds": kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crds", type=Path, help="the Prometheus Operator's CRD directory (example/"
                        "prometheus-operator-crd of its repository); without it the CRD bundle is left as is")
    args = parser.parse_args()
    for version in K8S_VERSIONS:
        minor = version.rsplit(".", 1)[0]
        (HERE / f"kubernetes-v{minor}.json").write_text(json.dumps(kubernetes_bundle(version), sort_keys=True) + "\n")
    if args.crds is not None:
        (HERE / "monitoring.coreos.com-v1.json").write_text(json.dumps(crd_bundle(args.crds), sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
