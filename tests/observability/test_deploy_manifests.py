"""Structural checks of the deployment files (docker and kubectl cannot run here): docker-compose wires the
service, Prometheus and Grafana to files that exist; the Kubernetes manifests agree with each other and
with the service (probe routes, drain budget, the CLI's options, the metric the HPA scales on)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from tests.observability.conftest import DEPLOY, REPO

K8S = DEPLOY / "k8s"


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


# --- kubernetes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the object, for the files of the kustomization plus the Job and the adapter config."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [K8S / name for name in kustomization["resources"]]
    files += [K8S / "conversion-job.yaml", K8S / "monitoring" / "prometheus-adapter-rules.yaml"]
    objects: dict[str, dict[str, Any]] = {}
    for path in files:
        assert path.is_file(), path
        for doc in load_all(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = obj["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_manifest_kinds(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {"Namespace", "PersistentVolumeClaim", "Deployment", "Service",
                              "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "Job", "ConfigMap"}
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
    assert "USER eas" in (REPO / "Dockerfile").read_text()


def test_pvc_service_and_servicemonitor_agree(manifests: dict[str, dict[str, Any]]) -> None:
    deployment, service, monitor = manifests["Deployment"], manifests["Service"], manifests["ServiceMonitor"]
    pvc_name = manifests["PersistentVolumeClaim"]["metadata"]["name"]
    for workload in (deployment, manifests["Job"]):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in container(workload)["volumeMounts"]}
        assert volumes["model-store"]["persistentVolumeClaim"]["claimName"] == pvc_name
        assert mounts["model-store"] == "/data/store"
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


def test_deploy_readme_mentions_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in {".yml", ".yaml", ".json", ".py"} and "tests" not in path.parts:
            rel = path.relative_to(DEPLOY).as_posix()
            assert rel in readme or path.name in readme, rel


def test_dockerfile_is_multi_stage_non_root_cuda() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:", text, re.M)
    assert re.search(r"^USER eas$", text, re.M) and "EXPOSE 8000" in text
    assert "torchvision" not in text.replace("torchvision is never installed", "")


def test_dockerfile_copies_every_package_the_install_needs() -> None:
    """The image installs the project from the copied sources: a top-level package left out (the tools floor
    holds the `eas` entry point) would install an `eas` command that cannot start."""
    text = (REPO / "Dockerfile").read_text()
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")
    assert "eas_tools" in packages
    missing = [name for name in packages if not re.search(rf"^COPY {name} \./{name}$", text, re.M)]
    assert missing == []
