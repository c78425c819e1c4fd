"""What can be checked of the production infra without a docker engine or a cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).parents[2] / "infra"
ENV = {
    "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p" * 12, "LABEL_STUDIO_DB_PASSWORD": "p",
    "LABEL_STUDIO_USERNAME": "a@b.c", "LABEL_STUDIO_PASSWORD": "p", "LABEL_STUDIO_TOKEN": "t",
    "PREFECT_DB_PASSWORD": "p", "SFTFLOW_WEBHOOK_SECRET": "s",
}


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False
    ).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_valid_per_docker_compose(tmp_path):
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in ENV.items()))
    res = subprocess.run(
        [*cmd, "-f", str(INFRA / "docker-compose.yml"), "--env-file", str(env_file), "config", "-q"],
        capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert res.returncode == 0, res.stderr


def test_compose_refuses_to_start_without_secrets():
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    res = subprocess.run(
        [*cmd, "-f", str(INFRA / "docker-compose.yml"), "config", "-q"],
        capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert res.returncode != 0 and "set " in res.stderr


def test_compose_services_and_references():
    doc = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"minio", "labelstudio", "labelstudio-db", "prefect-server", "prefect-db",
            "prefect-worker", "webhooks"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    assert "3.8.8" in services["prefect-server"]["image"]  # the version the project pins
    from sftflow.infra.services import PREFECT_EVENTS_ENV  # as the local stack's server

    assert PREFECT_EVENTS_ENV.items() <= services["prefect-server"]["environment"].items()


def test_k8s_manifests_parse_and_reference_each_other():
    kinds = {}
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["metadata"]["name"], path
            kinds.setdefault(doc["kind"], []).append(doc)
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
            "Service"} <= set(kinds)
    worker = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "prefect-worker")
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == "prefect-worker"
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert "gpu_count" in template["variables"]["properties"]
