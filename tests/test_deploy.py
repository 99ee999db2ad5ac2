"""Deployment files: compose against the compose-spec schema, k8s against the Kubernetes API
schemas, and the cross-references between them, the Dockerfile and the service's settings."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.settings import Settings
from tests.contract import DESIGN_METRICS

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
MONITORING = REPO / "deploy" / "monitoring"
K8S_VERSIONS = ("1.28.0", "1.35.0")  # an older supported release and a recent one
METRICS = DESIGN_METRICS
SETTINGS_ENV = {f"CXR_{name.upper()}" for name in Settings.model_fields}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def mount_target(volume: str) -> tuple[str, str]:
    """(container path, mode) of a short-syntax volume; the source may hold ``${VAR:-x}``."""
    parts = volume.rsplit(":", 2)
    if parts[-1] in ("ro", "rw"):
        return parts[-2], parts[-1]
    return volume.rsplit(":", 1)[1], "rw"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(REPO / "docker-compose.yml")


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((REPO / "deploy" / "schema" / "compose-spec.json").read_text())
    # The schema names draft 2019-09 by an old URI that jsonschema no longer maps itself.
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


@pytest.fixture(scope="module")
def k8s_docs() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/k8s by ``Kind/name`` (the HPA alternative as ``.../queue``)."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            key = f"{doc['kind']}/{doc['metadata']['name']}"
            docs[key + ("/queue" if "queue" in path.name else "")] = doc
    return docs


# --- compose ------------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec_schema(
    compose: dict[str, Any], compose_validator: jsonschema.protocols.Validator
) -> None:
    errors = compose_validator.iter_errors(compose)
    assert [f"{list(e.absolute_path)}: {e.message}" for e in errors] == []


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (
            (
                "services",
                "cxr-triage",
                "deploy",
                "resources",
                "reservations",
                "devices",
                0,
                "capabilities",
            ),
            "gpu",
        ),
        (("services", "cxr-triage", "healthcheck", "start_periodd"), "90s"),
        (("services", "cxr-triage", "ports"), "8000:8000"),
    ],
)
def test_the_schema_check_has_teeth(
    compose: dict[str, Any],
    compose_validator: jsonschema.protocols.Validator,
    where: tuple[Any, ...],
    value: object,
) -> None:
    broken = copy.deepcopy(compose)
    node = broken
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    assert list(compose_validator.iter_errors(broken))


def test_gpu_service_reserves_one_nvidia_gpu_and_cpu_profile_needs_none(
    compose: dict[str, Any],
) -> None:
    gpu, cpu = compose["services"]["cxr-triage"], compose["services"]["cxr-triage-cpu"]
    assert "profiles" not in gpu, "`docker compose up` must start the GPU service"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert gpu["environment"]["CXR_PROVIDERS"].endswith("cuda}")

    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert cpu["environment"]["CXR_PROVIDERS"] == "cpu"
    assert cpu["build"]["args"]["ORT_EXTRAS"] == ""
    assert cpu["image"] != gpu["image"], "the CPU image must not overwrite the GPU one"
    published = [p.rsplit(":", 2)[-2] for s in (gpu, cpu) for p in s["ports"]]
    assert len(set(published)) == 4, "both services (HTTP and DICOM) can run side by side"


def test_compose_services_share_the_image_contract(compose: dict[str, Any]) -> None:
    for name in ("cxr-triage", "cxr-triage-cpu"):
        service = compose["services"][name]
        assert service["read_only"] is True
        assert "/tmp" in service["tmpfs"]
        mounts = [mount_target(v) for v in service["volumes"]]
        assert ("/models", "ro") in mounts, "model folders are mounted read-only at /models"
        assert ("/var/lib/cxr-triage", "rw") in mounts
        assert set(service["environment"]) <= SETTINGS_ENV, "every CXR_ variable must exist"
        assert [p.rsplit(":", 1)[-1] for p in service["ports"]] == ["8000", "11112"]
        assert service["environment"]["CXR_DICOM_PORT"] == "11112"  # HTTP and DICOM published
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "python3"] and "/readyz" in test[-1]
    for volume in ("cxr-state", "cxr-state-cpu", "prometheus-data", "grafana-data", "orthanc-data"):
        assert volume in compose["volumes"]


def test_pacs_profile_wires_the_demo_orthanc_both_ways(compose: dict[str, Any]) -> None:
    """Orthanc sends to the service's AE at the host ``cxr-triage`` (either variant answers to
    it) and the demo env points the service's results back at Orthanc's AE and port."""
    services = compose["services"]
    orthanc = services["orthanc"]
    assert orthanc["profiles"] == ["pacs"]
    config_dir = REPO / "deploy" / "orthanc"
    assert ("/etc/cxr-orthanc", "ro") in [mount_target(v) for v in orthanc["volumes"]]
    config = json.loads((config_dir / "orthanc.json").read_text())
    assert orthanc["command"] == ["/etc/cxr-orthanc/orthanc.json"]
    for script in config["LuaScripts"]:
        assert (config_dir / Path(script).relative_to("/etc/cxr-orthanc")).is_file()
    (ae, host, port) = config["DicomModalities"]["cxr-triage"]
    assert (ae, host, port) == (Settings().dicom_ae_title, "cxr-triage", 11112)
    assert "cxr-triage" in services["cxr-triage-cpu"]["networks"]["default"]["aliases"]
    demo = dict(
        line.split("=", 1)
        for line in (config_dir / "demo.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(demo) <= SETTINGS_ENV
    assert demo["CXR_DESTINATIONS"] == f"dimse://{config['DicomAet']}@orthanc:{config['DicomPort']}"
    assert config["DicomAet"] in demo["CXR_DICOM_ALLOWED_AES"].split(",")
    published = [p.rsplit(":", 1)[-1] for p in orthanc["ports"]]
    assert published == [str(config["HttpPort"]), str(config["DicomPort"])]


def test_monitoring_profile_scrapes_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{service} mounts missing {source}"

    prometheus = load_yaml(MONITORING / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["cxr-triage:8000", "cxr-triage-cpu:8000"]
    assert all(t.split(":")[0] in services for t in targets)


def test_grafana_provisioning_and_dashboard_cover_the_design_metrics() -> None:
    provisioning = MONITORING / "grafana" / "provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "cxr-triage.yml")["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "cxr-triage.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    names = {m for e in exprs for m in re.findall(r"\b(cxr_[a-z_]+)", e)}
    for metric in METRICS:
        assert any(n == metric or n.startswith(metric + "_") for n in names), metric
    # histograms are queried through their _bucket/_sum/_count series, never bare
    for histogram in (
        "cxr_request_duration_seconds",
        "cxr_batch_size",
        "cxr_inference_duration_seconds",
        "cxr_decode_duration_seconds",
    ):
        assert histogram not in names
    assert all('instance=~"$instance"' in e for e in exprs)


def test_prometheus_queries_match_what_the_service_exports(tiny_client_metrics: str) -> None:
    """The dashboard's series names exist in a real /metrics page of the app."""
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "cxr-triage.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for name in {m for e in exprs for m in re.findall(r"\b(cxr_[a-z_]+)", e)}:
        assert re.search(rf"^{name}[{{ ]", tiny_client_metrics, re.M), name


@pytest.fixture(scope="module")
def tiny_client_metrics(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One prediction through the real app on the tiny model, then its /metrics text."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from app.main import create_app
    from tests.model_fixtures import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    settings = Settings(
        model_dir=folder, providers="cpu", intra_op_threads=1, audit_db=None, log_json=False
    )
    png = io.BytesIO()
    Image.new("L", (64, 48), 128).save(png, "PNG")
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/predict", content=png.getvalue(), headers={"Content-Type": "image/png"}
        )
        assert response.status_code == 200, response.text
        return client.get("/metrics").text


# --- kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(
    k8s_docs: dict[str, dict[str, Any]], version: str
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    assert set(k8s_docs) >= {
        "Deployment/cxr-triage",
        "Service/cxr-triage",
        "HorizontalPodAutoscaler/cxr-triage",
        "ConfigMap/cxr-triage-config",
        "Secret/cxr-triage-api-keys",
    }
    for key, doc in k8s_docs.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{key} invalid for Kubernetes {version}: {error.message}")


def test_deployment_probes_ports_gpu_and_security(k8s_docs: dict[str, dict[str, Any]]) -> None:
    deployment = k8s_docs["Deployment/cxr-triage"]
    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time to load a model"

    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert "cpu" in resources["requests"], "the CPU HPA needs a CPU request"

    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == 10001
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert {"/tmp", "/var/lib/cxr-triage"} <= set(mounts) and set(mounts.values()) <= volumes


def test_deployment_config_and_secret_references_resolve(
    k8s_docs: dict[str, dict[str, Any]],
) -> None:
    (container,) = k8s_docs["Deployment/cxr-triage"]["spec"]["template"]["spec"]["containers"]
    (source,) = container["envFrom"]
    config = k8s_docs[f"ConfigMap/{source['configMapRef']['name']}"]
    assert set(config["data"]) <= SETTINGS_ENV, set(config["data"]) - SETTINGS_ENV
    assert all(isinstance(v, str) for v in config["data"].values())
    Settings.model_validate({k[4:].lower(): v for k, v in config["data"].items()})
    (api_keys,) = [e for e in container["env"] if e["name"] == "CXR_API_KEYS"]
    ref = api_keys["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True, "no Secret means no auth, not a pod that never starts"
    assert ref["key"] in k8s_docs[f"Secret/{ref['name']}"]["stringData"]


def test_service_and_hpas_point_at_the_deployment(k8s_docs: dict[str, dict[str, Any]]) -> None:
    pod_labels = k8s_docs["Deployment/cxr-triage"]["spec"]["template"]["metadata"]["labels"]
    service = k8s_docs["Service/cxr-triage"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    for key in ("HorizontalPodAutoscaler/cxr-triage", "HorizontalPodAutoscaler/cxr-triage/queue"):
        hpa = k8s_docs[key]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "cxr-triage",
        }
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    queue_metric = k8s_docs["HorizontalPodAutoscaler/cxr-triage/queue"]["spec"]["metrics"][0]
    assert queue_metric["pods"]["metric"]["name"] == "cxr_queue_depth"


def test_kustomization_lists_existing_files() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]
    assert "hpa-queue-depth.yaml" not in kustomization["resources"], "one HPA per Deployment"


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    runtime = instructions[[op for op, _ in instructions].index("FROM", 2) :]
    ops = dict(runtime)
    assert ops["USER"] == "10001:10001"
    assert ops["EXPOSE"] == "8000 11112"  # HTTP and the DICOM listener (CXR_DICOM_PORT)
    assert "/readyz" in ops["HEALTHCHECK"]
    assert "torch" not in (REPO / "Dockerfile").read_text().replace("no torch", "")
    envs = " ".join(arg for op, arg in runtime if op == "ENV")
    assert "HOST=0.0.0.0" in envs and "PORT=8000" in envs
    model_dir = re.search(r"CXR_MODEL_DIR=(\S+)", envs).group(1)
    assert f"COPY ${{MODEL_DIR}} {model_dir}" in [f"{op} {arg}" for op, arg in runtime]
    config = load_yaml(K8S / "configmap.yaml")["data"]
    assert config["CXR_MODEL_DIR"] == model_dir
    assert config["CXR_AUDIT_DB"].startswith("/var/lib/cxr-triage/")


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for must in (".git", ".venv", "tests", "runs", "data"):
        assert must in patterns
    for needed in ("app", "training", "models", "pyproject.toml", "README.md"):
        assert needed not in patterns


class _Readyz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_healthcheck_one_liner_judges_readyz(status: int, healthy: bool) -> None:
    """Run the Dockerfile's HEALTHCHECK command itself against a local /readyz."""
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    argv = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert argv[:2] == ["python3", "-c"]
    handler = type("Handler", (_Readyz,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        env = {**os.environ, "PORT": str(server.server_address[1])}
        done = subprocess.run(
            [sys.executable, "-c", argv[2]], env=env, capture_output=True, timeout=120, check=False
        )
    finally:
        server.shutdown()
        server.server_close()
    assert (done.returncode == 0) is healthy, done.stderr


def test_smoke_script_parses() -> None:
    script = REPO / "scripts" / "docker-smoke.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=120)
