"""deploy/k8s and the compose MinIO variant agree with the code (GitHub issue 12, points 5-6).

No cluster and no Docker engine run here, so the manifests are read and checked: every
`BNSERVE_*` variable is a real setting and together they are valid, the probes name real routes
with a Host the server answers for, ports agree between settings, containers and Services, and
the database and bucket URLs name the services that provide them. `kubectl kustomize` (offline)
renders the set when kubectl is installed; `kubectl apply --dry-run=client` needs an API server.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]

from service.api.hosts import AllowedHostsMiddleware
from service.api.routes import health
from tests.conftest import REPO, TOKEN
from tests.test_containers import assert_settings, compose, docker_env

K8S = REPO / "deploy" / "k8s"
MINIO_COMPOSE = REPO / "docker-compose.minio.yml"


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return dict(found)


def container(kind: str, name: str) -> dict[str, Any]:
    (found,) = one(kind, name)["spec"]["template"]["spec"]["containers"]
    return dict(found)


def pod_env(c: dict[str, Any]) -> dict[str, str]:
    """The variables a container gets: its envFrom ConfigMaps and Secrets, then its env."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(one("Secret", source["secretRef"]["name"])["stringData"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = one("Secret", ref["name"])["stringData"][ref["key"]]
    return env


def service_port(name: str) -> dict[str, Any]:
    (port,) = one("Service", name)["spec"]["ports"]
    return dict(port)


def container_port(c: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return int(port)


def routes() -> set[str]:
    """The health routes as the app mounts them (the probes' only targets)."""
    return {str(getattr(r, "path", "")) for r in health.router.routes}


def test_every_file_is_in_the_kustomization_and_every_object_is_named() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = sorted(d["kind"] for d in manifests())
    assert kinds.count("Deployment") == 2
    assert {"Secret", "ConfigMap", "Service", "StatefulSet", "Job"} <= set(kinds)


@pytest.mark.parametrize("name", ["bnserve-api", "bnserve-worker"])
def test_bnserve_settings_are_real_and_valid(name: str) -> None:
    c = container("Deployment", name)
    settings = assert_settings(pod_env(c), f"deploy/k8s {name}")
    assert settings.remote_storage
    assert settings.database_url.startswith("postgresql")
    # Every pod has its own cache on a volume mounted where BNSERVE_DATA_DIR says.
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == str(settings.DATA_DIR)
    assert c["command"][:2] == ["python", "-m"]
    assert c["image"] == container("Deployment", "bnserve-api")["image"]


def test_api_probes_name_real_routes_and_ports_agree() -> None:
    c = container("Deployment", "bnserve-api")
    settings = assert_settings(pod_env(c), "api")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    hosts = AllowedHostsMiddleware(None, settings.allowed_hosts())  # type: ignore[arg-type]
    for probe in (c["readinessProbe"], c["livenessProbe"], c["startupProbe"]):
        get = probe["httpGet"]
        assert get["path"] in routes()
        assert container_port(c, get["port"]) == settings.PORT
        # The kubelet sends the pod's IP as Host unless told: the server must answer this one.
        (host,) = [h["value"] for h in get["httpHeaders"] if h["name"] == "Host"]
        assert hosts.allows(host)
    assert settings.HOST == "0.0.0.0"
    assert settings.WORKERS == 0  # training runs in the worker Deployment
    port = service_port("bnserve-api")
    assert port["targetPort"] == "http"
    assert container_port(c, "http") == settings.PORT == port["port"]
    assert hosts.allows("bnserve-api")
    labels = one("Deployment", "bnserve-api")["spec"]["template"]["metadata"]["labels"]
    assert one("Service", "bnserve-api")["spec"]["selector"].items() <= labels.items()


def test_database_and_bucket_urls_name_the_services_that_provide_them() -> None:
    env = pod_env(container("Deployment", "bnserve-api"))
    db = urlsplit(env["BNSERVE_DATABASE_URL"])
    pg = container("StatefulSet", "bnserve-postgres")
    pg_env = pod_env(pg)
    assert db.hostname == "bnserve-postgres"
    assert db.port == service_port("bnserve-postgres")["port"] == container_port(pg, "postgres")
    assert (db.username, db.password, db.path) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        "/" + pg_env["POSTGRES_DB"],
    )
    s3 = urlsplit(env["AWS_ENDPOINT_URL"])
    minio = container("StatefulSet", "bnserve-minio")
    assert s3.hostname == "bnserve-minio"
    assert s3.port == service_port("bnserve-minio")["port"] == container_port(minio, "s3")
    minio_env = pod_env(minio)
    assert (minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"]) == (
        env["AWS_ACCESS_KEY_ID"],
        env["AWS_SECRET_ACCESS_KEY"],
    )
    bucket = urlsplit(env["BNSERVE_STORAGE_URL"]).hostname
    (mc,) = one("Job", "bnserve-minio-bucket")["spec"]["template"]["spec"]["containers"]
    assert f"mc mb --ignore-existing store/{bucket}" in " ".join(mc["command"])
    assert "http://bnserve-minio:9000" in " ".join(mc["command"])


def test_every_container_requests_resources_and_threads_match_the_cpus() -> None:
    for doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
    api, worker = container("Deployment", "bnserve-api"), container("Deployment", "bnserve-worker")
    assert pod_env(api)["BNSERVE_SERVE_THREADS"] == api["resources"]["requests"]["cpu"]
    assert pod_env(worker)["BNSERVE_WORKER_THREADS"] == worker["resources"]["requests"]["cpu"]
    # The cache fits in the pod's volume.
    for c, name in ((api, "bnserve-api"), (worker, "bnserve-worker")):
        (volume,) = one("Deployment", name)["spec"]["template"]["spec"]["volumes"]
        limit = volume["emptyDir"]["sizeLimit"]
        assert int(pod_env(c)["BNSERVE_CACHE_BYTES"]) < int(limit.removesuffix("Gi")) << 30


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_renders_the_kustomization() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in manifests()
    )
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "bnserve" for d in docs)


# --- docker-compose.minio.yml ------------------------------------------------------------------


def _interpolate(value: Any, given: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` with `given` set, `$$` kept."""

    def one_var(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if name in given:
            return given[name]
        assert op != ":?", f"{name} must be set: {arg}"
        return arg

    return re.sub(r"(?<!\$)\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", one_var, str(value))


def minio_stack() -> dict[str, Any]:
    """docker-compose.yml with the MinIO file on top, as `docker compose -f a -f b` merges them."""
    base, extra = compose(), yaml.safe_load(MINIO_COMPOSE.read_text())
    services = dict(base["services"])
    for name, override in extra["services"].items():
        merged = dict(services.get(name, {}))
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        services[name] = merged
    return {"services": services, "volumes": {**base["volumes"], **extra["volumes"]}}


def minio_env(service: dict[str, Any], given: dict[str, str]) -> dict[str, str]:
    env = dict(docker_env())
    env.update({k: _interpolate(v, given) for k, v in (service.get("environment") or {}).items()})
    return env


def test_compose_minio_variant_is_valid_and_refuses_to_start_without_a_token() -> None:
    stack = minio_stack()["services"]
    given = {"BNSERVE_API_TOKEN": TOKEN}
    for name in ("api", "worker"):
        settings = assert_settings(minio_env(stack[name], given), f"minio {name}")
        assert settings.remote_storage
        assert stack[name]["depends_on"]["minio-bucket"]["condition"] == (
            "service_completed_successfully"
        )
        assert stack[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    with pytest.raises(AssertionError, match="BNSERVE_API_TOKEN must be set"):
        minio_env(stack["api"], {})


def test_compose_minio_endpoint_credentials_and_bucket_agree() -> None:
    stack = minio_stack()
    services = stack["services"]
    env = minio_env(services["api"], {"BNSERVE_API_TOKEN": TOKEN})
    minio = {k: _interpolate(v, {}) for k, v in services["minio"]["environment"].items()}
    endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
    assert (endpoint.hostname, endpoint.port) == ("minio", 9000)
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    bucket = urlsplit(env["BNSERVE_STORAGE_URL"]).hostname
    (command,) = services["minio-bucket"]["command"]
    assert f"mc mb --ignore-existing store/{bucket}" in command
    assert "http://minio:9000 bnserve " in command
    assert services["minio"]["volumes"][0].split(":")[0] in stack["volumes"]
    assert "mc" in services["minio"]["healthcheck"]["test"]


def test_the_image_installs_the_s3_client() -> None:
    assert '"[postgres,s3]"' in Path(REPO / "Dockerfile").read_text()
