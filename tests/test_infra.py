"""infra/: the compose file validates where docker is installed; the Kubernetes template is a valid work-pool template."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO


def test_compose_file_validates():
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed on this machine; `docker compose config` cannot run")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker is installed without the compose plugin; `docker compose config` cannot run")
    env_file = REPO / "infra" / "env.example"
    done = subprocess.run(["docker", "compose", "-f", str(REPO / "infra" / "docker-compose.yml"), "--env-file", str(env_file),
                           "config", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_compose_file_declares_the_services():
    config = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    services = config["services"]
    assert {"postgres", "prefect-server", "minio", "minio-bucket", "worker-cpu", "worker-gpu", "deploy"} <= set(services)
    assert "postgresql+asyncpg" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "--pool gpu" in " ".join(services["worker-gpu"]["command"]) and "--pool cpu" in " ".join(services["worker-cpu"]["command"])
    for worker in ("worker-cpu", "worker-gpu"):  # each replica names itself after its own container, not the host
        assert "$$(hostname)" in " ".join(services[worker]["command"]) and "HOSTNAME" not in " ".join(services[worker]["command"])
    for name, service in services.items():  # every image pinned to a release: nothing changes under a running lake
        if "image" in service:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
    assert "mc mb" in " ".join(services["minio-bucket"]["entrypoint"])
    text = (REPO / "infra" / "docker-compose.yml").read_text()
    assert "change-me" not in text, "passwords belong in infra/.env, not in the compose file"


def test_kubernetes_template_requests_gpus():
    template = json.loads((REPO / "infra" / "kubernetes" / "gpu-base-job-template.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    variables = template["variables"]["properties"]
    assert variables["gpus"]["default"] >= 1
    # every placeholder the job configuration uses is a declared variable
    import re

    used = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
    assert used <= set(variables), used - set(variables)
