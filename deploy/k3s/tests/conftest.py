"""Shared paths and loaders for the offline tests of the K3s deployment.

No cluster and no Prefect server is needed. Prefect reads its settings when it is imported, so
PREFECT_HOME is pointed at a fresh directory here, before any test module imports it, to keep
the user's own Prefect profile out of the rendered Jobs.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="k3s-tests-prefect-home-")
for _name in list(os.environ):
    if _name.startswith("PREFECT_") and _name != "PREFECT_HOME":
        del os.environ[_name]

K3S_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = K3S_DIR.parent.parent
RUN_SCRIPT = K3S_DIR / "run.sh"
TEMPLATE_FILE = K3S_DIR / "base-job-template.json"

# The Kubernetes minor version of the K3s release the README names. kubernetes-validate checks
# the manifests against the schemas of this version.
KUBERNETES_VERSION = "1.34"

NAMESPACE = "atlas"
RUNNER_IMAGE = "localhost/k3s-job-runner/python-runner:0.1.0"
WORKER_IMAGE = "localhost/k3s-job-runner/prefect-worker:0.1.0"
SERVER_IMAGE = "docker.io/prefecthq/prefect:3.9.1-python3.12"
PREFECT_API_URL = "http://prefect-server.atlas.svc.cluster.local:4200/api"


def manifest_files() -> list[Path]:
    """Return the numbered manifests in the order `run.sh up` applies them."""
    return sorted(K3S_DIR.glob("[0-9][0-9]-*.yaml"))


def load_manifests() -> list[dict[str, Any]]:
    """Load every object of every numbered manifest."""
    objects: list[dict[str, Any]] = []
    for path in manifest_files():
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


def find_object(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """Return the object of this kind and name, failing the test if there is none."""
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} named {name!r} in deploy/k3s/*.yaml")


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """Return the pod spec of a Deployment or Job."""
    return obj["spec"]["template"]["spec"]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the init containers and containers of a pod spec."""
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_values(container: dict[str, Any]) -> dict[str, Any]:
    """Map each environment variable of a container to its `value` or `valueFrom`."""
    return {
        entry["name"]: entry.get("value", entry.get("valueFrom"))
        for entry in container.get("env", [])
    }


@pytest.fixture(scope="session")
def manifests() -> list[dict[str, Any]]:
    return load_manifests()


@pytest.fixture(scope="session")
def plan_output() -> str:
    """Run `run.sh plan`, which needs kubectl but no cluster, and return its stdout.

    KUBECONFIG names a missing file, so the plan cannot reach any cluster.
    """
    result = subprocess.run(
        [str(RUN_SCRIPT), "plan"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KUBECONFIG": str(K3S_DIR / "tests" / "no-such-kubeconfig")},
    )
    assert result.returncode == 0, f"run.sh plan failed: {result.stderr}"
    return result.stdout
