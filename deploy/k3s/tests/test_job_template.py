"""Render the Job that prefect-kubernetes builds from base-job-template.json, and check it.

The rendering uses the worker's own configuration class, the way KubernetesWorker does for
each flow run: `from_template_and_values` with the deployment's job variables, then
`prepare_for_flow_run`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from typing import Any

import kubernetes_validate
import pytest
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.settings import PREFECT_API_URL as API_URL_SETTING
from prefect.settings import temporary_settings
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from conftest import (
    KUBERNETES_VERSION,
    NAMESPACE,
    PREFECT_API_URL,
    RUNNER_IMAGE,
    TEMPLATE_FILE,
    find_object,
)

# Largest `timeout_seconds` the service accepts plus its default start-up allowance, in
# seconds (K3S_JOB_RUNNER_MAX_TIMEOUT_SECONDS and K3S_JOB_RUNNER_STARTUP_ALLOWANCE_SECONDS).
MAX_RUN_SECONDS = 600 + 60


def load_template() -> dict[str, Any]:
    return json.loads(TEMPLATE_FILE.read_text())


def render_job(
    template: dict[str, Any] | None = None, job_variables: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return the Job manifest the worker would create for a sample flow run.

    The worker passes its own PREFECT_API_URL on to every flow run, so the rendering runs with
    the API URL that 60-prefect-worker.yaml gives the worker.
    """
    template = template or load_template()
    flow = Flow(id=uuid.uuid4(), name="python-runner")
    deployment = DeploymentResponse(
        id=uuid.uuid4(),
        name="python-runner",
        flow_id=flow.id,
        job_variables={"image": RUNNER_IMAGE, **(job_variables or {})},
    )
    flow_run = FlowRun(
        id=uuid.uuid4(), name="metal-monkey", flow_id=flow.id, deployment_id=deployment.id
    )
    with temporary_settings(updates={API_URL_SETTING: PREFECT_API_URL}):
        configuration = asyncio.run(
            KubernetesWorkerJobConfiguration.from_template_and_values(
                template, deployment.job_variables
            )
        )
        configuration.prepare_for_flow_run(
            flow_run=flow_run, deployment=deployment, flow=flow
        )
    return configuration.job_manifest


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    return render_job()


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def container(job: dict[str, Any]) -> dict[str, Any]:
    containers = pod(job)["containers"]
    assert len(containers) == 1
    return containers[0]


def env(job: dict[str, Any]) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container(job)["env"]}


def test_rendered_job_valid_for_kubernetes_version(job):
    # prefect-kubernetes 0.8.0 requires `parallelism` and `completions` in the pod spec,
    # where the API server ignores them as unknown fields (they belong in the Job spec). They
    # are the only fields strict validation may find unknown.
    stripped = copy.deepcopy(job)
    assert pod(stripped).pop("parallelism") == 1
    assert pod(stripped).pop("completions") == 1

    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=False)
    kubernetes_validate.validate(stripped, KUBERNETES_VERSION, strict=True)


def test_job_runs_once_and_is_deleted_later(job):
    spec = job["spec"]

    assert spec["backoffLimit"] == 0
    assert pod(job)["restartPolicy"] == "Never"
    assert spec["ttlSecondsAfterFinished"] == 300
    assert spec["activeDeadlineSeconds"] > MAX_RUN_SECONDS
    assert spec["activeDeadlineSeconds"] == 900


def test_job_in_namespace(job):
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["metadata"]["generateName"] == "metal-monkey-"


def test_pod_security_context(job):
    security = pod(job)["securityContext"]

    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 1000
    assert security["runAsGroup"] == 1000
    assert security["fsGroup"] == 1000
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_container_security_context(job):
    security = container(job)["securityContext"]

    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_no_service_account_token(job):
    assert pod(job)["automountServiceAccountToken"] is False
    assert pod(job)["serviceAccountName"] == "flow-run"
    assert pod(job)["enableServiceLinks"] is False


def test_tmp_is_size_limited_empty_dir(job):
    volumes = {volume["name"]: volume for volume in pod(job)["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container(job)["volumeMounts"]}

    assert list(mounts) == ["/tmp"]
    assert volumes[mounts["/tmp"]] == {"name": "tmp", "emptyDir": {"sizeLimit": "128Mi"}}


def test_resources_requests_equal_limits(job):
    resources = container(job)["resources"]

    assert resources["requests"] == {"cpu": "500m", "memory": "256Mi"}
    assert resources["limits"] == {"cpu": "500m", "memory": "256Mi"}


def test_command_is_prefect_flow_run_execute(job):
    assert container(job)["args"] == ["prefect", "flow-run", "execute"]
    assert "command" not in container(job)


def test_image_from_deployment(job):
    assert container(job)["image"] == RUNNER_IMAGE
    assert container(job)["imagePullPolicy"] == "Never"


def test_env_points_at_cluster_api(job):
    values = env(job)

    assert values["PREFECT_API_URL"] == PREFECT_API_URL
    assert uuid.UUID(values["PREFECT__FLOW_RUN_ID"])


def test_sigterm_crashes_instead_of_rescheduling(job):
    # The worker sets "reschedule" for backoffLimit 0 unless the variable is set, and a
    # rescheduled run would run the submitted code a second time.
    assert env(job)["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "crash"


def test_deployment_env_keeps_sigterm_setting():
    job = render_job(job_variables={"env": {"PYTHON_RUNNER_KILL_GRACE_SECONDS": "1"}})

    assert env(job)["PYTHON_RUNNER_KILL_GRACE_SECONDS"] == "1"
    assert env(job)["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "crash"


def test_job_variables_cannot_change_limits():
    job = render_job(
        job_variables={
            "memory_limit": "8Gi",
            "cpu_limit": "4",
            "namespace": "kube-system",
            "service_account_name": "prefect-worker",
            "backoff_limit": 5,
        }
    )

    assert container(job)["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi"}
    assert job["metadata"]["namespace"] == NAMESPACE
    assert pod(job)["serviceAccountName"] == "flow-run"
    assert job["spec"]["backoffLimit"] == 0


def test_network_policy_selects_flow_run_pods(job, manifests):
    policy = find_object(manifests, "NetworkPolicy", "flow-run")
    labels = job["spec"]["template"]["metadata"]["labels"]

    (expression,) = policy["spec"]["podSelector"]["matchExpressions"]
    assert expression["operator"] == "Exists"
    assert expression["key"] in labels


def test_template_keeps_worker_placeholders():
    configuration = load_template()["job_configuration"]
    manifest = configuration["job_manifest"]
    job_container = manifest["spec"]["template"]["spec"]["containers"][0]

    assert configuration["command"] == "{{ command }}"
    assert configuration["env"] == "{{ env }}"
    assert configuration["labels"] == "{{ labels }}"
    assert configuration["name"] == "{{ name }}"
    assert job_container["args"] == "{{ command }}"
    assert job_container["env"] == "{{ env }}"
    assert job_container["image"] == "{{ image }}"
    assert job_container["name"] == "prefect-job"
    assert manifest["metadata"]["generateName"] == "{{ name }}-"


def test_template_variables_subset_of_worker_defaults():
    ours = load_template()["variables"]["properties"]
    default = KubernetesWorker.get_default_base_job_template()["variables"]["properties"]

    assert set(ours) <= set(default)
    for name, schema in ours.items():
        assert schema.get("type") == default[name].get("type"), name


def test_broken_template_fails_render():
    template = load_template()
    broken = copy.deepcopy(template)
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "restartPolicy"
    ] = "OnFailure"

    with pytest.raises(ValueError, match="restartPolicy"):
        render_job(broken)
