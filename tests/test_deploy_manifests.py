"""The scale-out examples under deploy/ are checked as a deployment tool would read them:
every YAML parses, the Kubernetes objects carry their required fields and agree with each
other, the probe and scrape paths answer on a real ondo server, and the nginx upstreams, the
Prometheus targets and the compose services name the same replicas."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from ondo.server.app import build_app
from tests.server_harness import MODEL_NAME, ServerThread, make_async_llm

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes" / "ondo.yaml"
COMPOSE = DEPLOY / "compose.yaml"
NGINX = DEPLOY / "nginx" / "ondo.conf"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ONDO_PORT = 8000


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s() -> dict[str, dict]:
    return {d["kind"]: d for d in _docs(K8S)}


def _probes(deployment: dict) -> dict[str, dict]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}


def test_every_yaml_under_deploy_parses():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert {f.name for f in files} >= {"ondo.yaml", "compose.yaml", "prometheus.yml"}
    for f in files:
        assert _docs(f), f"{f} holds no YAML document"


def test_the_kubernetes_objects_have_their_required_fields_and_agree():
    objects = _k8s()
    assert set(objects) == {"Deployment", "Service", "ServiceMonitor"}
    for kind, obj in objects.items():
        assert obj.get("apiVersion") and obj.get("metadata", {}).get("name"), kind
    dep = objects["Deployment"]
    assert dep["apiVersion"] == "apps/v1"
    spec = dep["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["name"] and container["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": ONDO_PORT}
    for name, probe in _probes(dep).items():
        assert probe["httpGet"]["port"] in ports, name
    assert _probes(dep)["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert _probes(dep)["readinessProbe"]["httpGet"]["path"] == "/health"
    # SIGTERM drains for --shutdown-timeout (30 s by default): the pod must be given longer.
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts <= {v["name"] for v in spec["template"]["spec"]["volumes"]}

    svc = objects["Service"]
    assert svc["apiVersion"] == "v1"
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in ports
    mon = objects["ServiceMonitor"]
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"] and endpoint["path"] == "/metrics"


def _nginx_upstream(text: str) -> list[tuple[str, int]]:
    block = re.search(r"upstream\s+ondo\s*\{(.*?)\}", text, re.S)
    assert block, "no `upstream ondo` block"
    assert re.search(r"^\s*least_conn;", block.group(1), re.M)
    return [(host, int(port)) for host, port in
            re.findall(r"^\s*server\s+([\w.-]+):(\d+)", block.group(1), re.M)]


def test_nginx_prometheus_and_compose_name_the_same_replicas():
    compose = _docs(COMPOSE)[0]
    services = compose["services"]
    replicas = sorted(name for name, s in services.items() if s.get("image") == "ondo:latest")
    assert replicas == ["ondo-0", "ondo-1"]
    assert sorted(_nginx_upstream(NGINX.read_text())) == [(r, ONDO_PORT) for r in replicas]
    (job,) = _docs(PROMETHEUS)[0]["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    assert sorted(static["targets"]) == [f"{r}:{ONDO_PORT}" for r in replicas]
    devices = []
    for name in replicas:
        s = services[name]
        assert str(ONDO_PORT) in s["expose"]
        assert "/health" in " ".join(s["healthcheck"]["test"])
        (device,) = s["deploy"]["resources"]["reservations"]["devices"]
        devices += device["device_ids"]
        assert (DEPLOY / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
    assert len(set(devices)) == len(devices), "two replicas on one GPU"
    assert set(services["nginx"]["depends_on"]) == set(replicas)
    for service in ("nginx", "prometheus"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY / source).is_file(), f"{service} mounts {source}, not in deploy/"
    assert NGINX.name in services["nginx"]["volumes"][0]


def test_the_probe_and_scrape_paths_answer_on_a_real_server():
    dep = _k8s()["Deployment"]
    paths = {p["httpGet"]["path"] for p in _probes(dep).values()}
    paths |= {_k8s()["ServiceMonitor"]["spec"]["endpoints"][0]["path"]}
    compose_check = " ".join(_docs(COMPOSE)[0]["services"]["ondo-0"]["healthcheck"]["test"])
    paths |= set(re.findall(r"127\.0\.0\.1:\d+(/[\w/]+)", compose_check))
    assert paths == {"/health", "/health/live", "/metrics"}
    llm = make_async_llm(max_model_len=128, num_kv_blocks=16)
    try:
        with ServerThread(build_app(llm, MODEL_NAME)) as server:
            for path in sorted(paths):
                r = httpx.get(server.base_url + path, timeout=10)
                assert r.status_code == 200, (path, r.status_code)
            assert httpx.get(server.base_url + "/healthz", timeout=10).status_code == 404
    finally:
        llm.close()


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _docker_compose_available(),
                    reason="the docker compose plugin is not installed (the YAML checks above "
                           "stand in for it)")
def test_docker_compose_accepts_the_compose_file():
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("kubeconform") is None, reason="kubeconform is not installed")
def test_kubeconform_accepts_the_manifest():
    proc = subprocess.run(["kubeconform", "-strict", "-ignore-missing-schemas", str(K8S)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
