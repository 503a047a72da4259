"""Offline checks of the numbered manifests in deploy/k3s and of what `run.sh plan` prints."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from conftest import (
    KUBERNETES_VERSION,
    NAMESPACE,
    PREFECT_API_URL,
    RUNNER_IMAGE,
    SERVER_IMAGE,
    TEMPLATE_FILE,
    WORKER_IMAGE,
    all_containers,
    env_values,
    find_object,
    load_manifests,
    manifest_files,
    pod_spec,
)

# Every Kubernetes API call prefect-kubernetes 0.8.0 makes with the worker's settings, as
# (API group, resource, verbs). 30-prefect-worker-rbac.yaml explains each verb.
WORKER_ROLE_ALLOW_LIST = {
    ("batch", "jobs"): {"create", "delete", "get", "list", "watch"},
    ("", "pods"): {"list", "watch"},
    ("", "pods/log"): {"get"},
}

SECRET_NAME_PATTERN = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|AUTH_STRING", re.IGNORECASE)


def object_id(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] in ("Deployment", "Job")]


def plan_objects(plan_output: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(plan_output) if doc]


@pytest.mark.parametrize("obj", load_manifests(), ids=object_id)
def test_manifest_valid_for_kubernetes_version(obj):
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_validator_rejects_unknown_field(manifests):
    broken = copy.deepcopy(find_object(manifests, "Deployment", "prefect-worker"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Never"

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_object_in_namespace(manifests):
    for obj in manifests:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, object_id(obj)


def test_plan_lists_objects_in_apply_order(plan_output, manifests):
    planned = [object_id(obj) for obj in plan_objects(plan_output)]

    expected = [object_id(obj) for obj in manifests]
    expected.insert(1, "ConfigMap/prefect-base-job-template")
    assert planned == expected


def test_plan_waits_before_dependents(plan_output):
    lines = plan_output.splitlines()

    def position(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    def file_start(name: str) -> int:
        return lines.index(f"# deploy/k3s/{name}")

    assert position("rollout status deployment/postgres") < file_start("20-prefect-server.yaml")
    assert position("rollout status deployment/prefect-server") < file_start(
        "50-prefect-init.yaml"
    )
    assert position("delete job prefect-init") < file_start("50-prefect-init.yaml")
    assert position("wait --for=condition=complete job/prefect-init") < file_start(
        "60-prefect-worker.yaml"
    )
    assert file_start("40-network-policies.yaml") < file_start("60-prefect-worker.yaml")


def test_plan_configmap_holds_template_file(plan_output):
    configmap = find_object(plan_objects(plan_output), "ConfigMap", "prefect-base-job-template")

    kubernetes_validate.validate(configmap, KUBERNETES_VERSION, strict=True)
    assert configmap["data"]["base-job-template.json"] == TEMPLATE_FILE.read_text()


def test_init_job_mounts_template_configmap(manifests):
    spec = pod_spec(find_object(manifests, "Job", "prefect-init"))
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    create_pool = spec["initContainers"][0]

    assert volumes["base-job-template"]["configMap"]["name"] == "prefect-base-job-template"
    mounts = {mount["name"]: mount["mountPath"] for mount in create_pool["volumeMounts"]}
    template_path = f"{mounts['base-job-template']}/base-job-template.json"
    args = create_pool["args"]
    assert args[:4] == ["prefect", "work-pool", "create", "atlas-kubernetes"]
    assert args[args.index("--base-job-template") + 1] == template_path
    assert "--overwrite" in args
    assert args[args.index("--type") + 1] == "kubernetes"


def test_init_job_registers_deployment_with_runner_image(manifests):
    spec = pod_spec(find_object(manifests, "Job", "prefect-init"))
    register = spec["containers"][0]

    assert register["image"] == RUNNER_IMAGE
    assert register["args"][:2] == ["python", "/opt/flows/deploy.py"]
    args = register["args"]
    assert args[args.index("--pool") + 1] == "atlas-kubernetes"
    assert args[args.index("--name") + 1] == "python-runner"
    assert args[args.index("--image") + 1] == RUNNER_IMAGE
    for container in all_containers(spec):
        assert env_values(container)["PREFECT_API_URL"] == PREFECT_API_URL


def test_no_plaintext_secrets(manifests, plan_output):
    for obj in [*manifests, *plan_objects(plan_output)]:
        if obj["kind"] == "Secret":
            assert "data" not in obj, object_id(obj)
            assert "stringData" not in obj, object_id(obj)
    for obj in workloads(manifests):
        for container in all_containers(pod_spec(obj)):
            for entry in container.get("env", []):
                if SECRET_NAME_PATTERN.search(entry["name"]):
                    assert "value" not in entry, f"{object_id(obj)} sets {entry['name']}"
                    assert "secretKeyRef" in entry["valueFrom"], entry["name"]


def test_database_password_from_secret(manifests):
    expected = {"secretKeyRef": {"name": "prefect-postgres", "key": "password"}}
    postgres = pod_spec(find_object(manifests, "Deployment", "postgres"))["containers"][0]
    server = pod_spec(find_object(manifests, "Deployment", "prefect-server"))["containers"][0]

    assert env_values(postgres)["POSTGRES_PASSWORD"] == expected
    assert env_values(server)["PREFECT_SERVER_DATABASE_PASSWORD"] == expected


def test_worker_role_matches_allow_list(manifests):
    role = find_object(manifests, "Role", "prefect-worker")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])

    assert granted == WORKER_ROLE_ALLOW_LIST


def test_no_cluster_wide_rbac(manifests):
    kinds = {obj["kind"] for obj in manifests}

    assert "ClusterRole" not in kinds
    assert "ClusterRoleBinding" not in kinds


def test_worker_role_bound_to_worker_only(manifests):
    binding = find_object(manifests, "RoleBinding", "prefect-worker")
    worker = pod_spec(find_object(manifests, "Deployment", "prefect-worker"))

    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "prefect-worker",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "prefect-worker", "namespace": NAMESPACE}
    ]
    assert worker["serviceAccountName"] == "prefect-worker"


def test_flow_run_account_has_no_token(manifests):
    account = find_object(manifests, "ServiceAccount", "flow-run")
    template = json.loads(TEMPLATE_FILE.read_text())
    template_pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]

    assert account["automountServiceAccountToken"] is False
    assert template_pod["serviceAccountName"] == "flow-run"


def test_worker_settings(manifests):
    worker = pod_spec(find_object(manifests, "Deployment", "prefect-worker"))["containers"][0]
    env = env_values(worker)

    assert worker["image"] == WORKER_IMAGE
    assert worker["args"][:3] == ["prefect", "worker", "start"]
    assert worker["args"][worker["args"].index("--pool") + 1] == "atlas-kubernetes"
    assert worker["args"][worker["args"].index("--type") + 1] == "kubernetes"
    assert env["PREFECT_API_URL"] == PREFECT_API_URL
    assert env["PREFECT_WORKER_QUERY_SECONDS"] == "1"


def test_worker_observer_stays_in_namespace(manifests, monkeypatch):
    from prefect_kubernetes.settings import KubernetesSettings

    worker = pod_spec(find_object(manifests, "Deployment", "prefect-worker"))["containers"][0]
    for name, value in env_values(worker).items():
        monkeypatch.setenv(name, value)

    # An empty set would make the observer watch every namespace, which the Role forbids.
    assert KubernetesSettings().observer.namespaces == {NAMESPACE}


def test_worker_health_probes(manifests):
    worker = pod_spec(find_object(manifests, "Deployment", "prefect-worker"))["containers"][0]
    port = env_values(worker)["PREFECT_WORKER_WEBSERVER_PORT"]

    assert "--with-healthcheck" in worker["args"]
    assert worker["ports"][0]["containerPort"] == int(port)
    for probe in ("readinessProbe", "livenessProbe"):
        assert worker[probe]["httpGet"]["path"] == "/health"


def test_server_image_and_probes(manifests):
    server = pod_spec(find_object(manifests, "Deployment", "prefect-server"))["containers"][0]

    assert server["image"] == SERVER_IMAGE
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/api/health", probe


def test_server_settings_resolve_in_prefect(manifests, monkeypatch):
    from prefect.settings import Settings

    server = pod_spec(find_object(manifests, "Deployment", "prefect-server"))["containers"][0]
    for name, value in env_values(server).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    # A password with URL delimiters, to check that Prefect escapes it.
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_PASSWORD", "p@ss/word:1")

    settings = Settings()

    assert settings.server.ui.serve_base == "/prefect"
    assert settings.server.ui.api_url == "/api"
    assert settings.server.ui.static_directory == "/tmp/ui"
    assert settings.server.api.base_path is None
    url = settings.server.database.connection_url.get_secret_value()
    assert url == (
        "postgresql+asyncpg://prefect:p%40ss%2Fword%3A1"
        "@postgres.atlas.svc.cluster.local:5432/prefect"
    )


def test_postgres_storage_and_probes(manifests):
    postgres = find_object(manifests, "Deployment", "postgres")
    container = pod_spec(postgres)["containers"][0]
    volumes = {volume["name"]: volume for volume in pod_spec(postgres)["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}

    assert container["image"].startswith("docker.io/library/postgres:16.")
    assert postgres["spec"]["strategy"]["type"] == "Recreate"
    data_volume = volumes[mounts["/var/lib/postgresql/data"]]
    assert data_volume["persistentVolumeClaim"]["claimName"] == "postgres-data"
    find_object(manifests, "PersistentVolumeClaim", "postgres-data")
    assert env_values(container)["PGDATA"].startswith("/var/lib/postgresql/data/")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][0] == "pg_isready", probe


@pytest.mark.parametrize(
    "name", ["postgres", "prefect-server", "prefect-worker", "prefect-init"]
)
def test_pod_meets_restricted_profile(manifests, name):
    kind = "Job" if name == "prefect-init" else "Deployment"
    spec = pod_spec(find_object(manifests, kind, name))
    pod_security = spec["securityContext"]

    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in all_containers(spec):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]


def test_namespace_enforces_restricted_profile(manifests):
    labels = find_object(manifests, "Namespace", NAMESPACE)["metadata"]["labels"]

    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_only_worker_mounts_account_token(manifests):
    for obj in workloads(manifests):
        expected = obj["metadata"]["name"] == "prefect-worker"
        assert pod_spec(obj)["automountServiceAccountToken"] is expected, object_id(obj)


def test_our_images_never_pulled(manifests):
    for obj in workloads(manifests):
        for container in all_containers(pod_spec(obj)):
            if container["image"].startswith("localhost/"):
                assert container["imagePullPolicy"] == "Never", container["name"]
                assert container["image"] in (RUNNER_IMAGE, WORKER_IMAGE)


def test_flow_run_policy_allows_only_api_and_dns(manifests):
    policy = find_object(manifests, "NetworkPolicy", "flow-run")["spec"]

    assert policy["podSelector"] == {
        "matchExpressions": [{"key": "prefect.io/flow-run-id", "operator": "Exists"}]
    }
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["ingress"] == []
    api_rule, dns_rule = policy["egress"]
    assert api_rule["to"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prefect-server"}}}
    ]
    assert api_rule["ports"] == [{"protocol": "TCP", "port": 4200}]
    assert dns_rule["to"] == [
        {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
            },
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert dns_rule["ports"] == [
        {"protocol": "UDP", "port": 53},
        {"protocol": "TCP", "port": 53},
    ]


def test_flow_run_policy_reaches_server_pods(manifests):
    server = find_object(manifests, "Deployment", "prefect-server")
    service = find_object(manifests, "Service", "prefect-server")
    policy = find_object(manifests, "NetworkPolicy", "flow-run")["spec"]
    allowed = policy["egress"][0]["to"][0]["podSelector"]["matchLabels"]
    pod_labels = server["spec"]["template"]["metadata"]["labels"]

    assert allowed.items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["port"] == 4200
    assert policy["egress"][0]["ports"][0]["port"] == server["spec"]["template"]["spec"][
        "containers"
    ][0]["ports"][0]["containerPort"]


def test_manifest_files_numbered_uniquely():
    prefixes = [path.name[:2] for path in manifest_files()]

    assert len(prefixes) == len(set(prefixes))
    assert manifest_files()[0].name == "00-namespace.yaml"
