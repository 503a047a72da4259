#!/usr/bin/env bash
# Build, deploy and inspect the production stack of k3s-job-runner on a single-node K3s:
# Postgres, the Prefect server, a `kubernetes` work pool with its worker, and the
# python-runner deployment, all in the namespace `atlas`.
#
# Usage: deploy/k3s/run.sh build|up|down|status|plan|help
#
# Settings, read from the environment:
#   K3S_CONTAINER_TOOL   program that builds and saves the images: podman (default) or docker
#   K3S_WAIT_TIMEOUT     how long `up` waits for each rollout and for the init Job (default 300s)
#
# `up` and `plan` walk the same steps, so `plan` prints exactly what `up` applies. The work
# pool's base job template has one source, base-job-template.json: both generate the ConfigMap
# that the init Job mounts from that file with `kubectl create configmap --dry-run=client`,
# which needs no cluster, so the ConfigMap cannot drift from the file.

set -euo pipefail

K3S_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$K3S_DIR/../.." && pwd)"

CONTAINER_TOOL="${K3S_CONTAINER_TOOL:-podman}"
WAIT_TIMEOUT="${K3S_WAIT_TIMEOUT:-300s}"

# These names also appear in the manifests and in base-job-template.json, and the tests in
# deploy/k3s/tests check that they agree.
NAMESPACE=atlas
IMAGE_TAG=0.1.0
RUNNER_IMAGE="localhost/k3s-job-runner/python-runner:$IMAGE_TAG"
WORKER_IMAGE="localhost/k3s-job-runner/prefect-worker:$IMAGE_TAG"
TEMPLATE_FILE="$K3S_DIR/base-job-template.json"
TEMPLATE_CONFIGMAP=prefect-base-job-template
DATABASE_SECRET=prefect-postgres
INIT_JOB=prefect-init

# `apply` runs the steps against the cluster, and `plan` prints them instead.
MODE=apply

usage() {
  cat <<EOF
Usage: $0 build|up|down|status|plan|help

  build   build the runner and worker images with $CONTAINER_TOOL and import them into
          K3s's containerd (k3s ctr needs root)
  up      apply the namespace, the base job template's ConfigMap and the manifests in order,
          waiting for Postgres, the Prefect server, the init Job and the worker to be ready
  down    delete the Deployments and Jobs, including running flow-run Jobs; the database
          volume, the Secret, the Services and the configuration stay
  status  show the pods, Jobs and volume, and the Prefect API's health and deployment
  plan    print every object that \`up\` applies, in order, without a cluster

Settings (environment variables):
  K3S_CONTAINER_TOOL   program that builds and saves the images (default podman)
  K3S_WAIT_TIMEOUT     how long \`up\` waits for each rollout and the init Job (default 300s)
EOF
}

log() {
  echo "k3s: $*" >&2
}

die() {
  log "error: $*"
  exit 1
}

require() {
  local program="$1" hint="$2"
  command -v "$program" >/dev/null || die "$program is required but not installed. $hint"
}

# Print the ConfigMap that contains base-job-template.json under the same file name.
template_configmap() {
  kubectl create configmap "$TEMPLATE_CONFIGMAP" \
    --namespace "$NAMESPACE" \
    --from-file="base-job-template.json=$TEMPLATE_FILE" \
    --dry-run=client --output yaml
}

apply_configmap() {
  if [[ "$MODE" == plan ]]; then
    printf -- '---\n# ConfigMap generated from deploy/k3s/base-job-template.json\n'
    template_configmap
  else
    log "applying ConfigMap $TEMPLATE_CONFIGMAP from $(basename "$TEMPLATE_FILE")"
    template_configmap | kubectl apply -f -
  fi
}

apply_manifest() {
  local file="$1"
  if [[ "$MODE" == plan ]]; then
    printf -- '---\n# deploy/k3s/%s\n' "$file"
    cat "$K3S_DIR/$file"
  else
    log "applying $file"
    kubectl apply -f "$K3S_DIR/$file"
  fi
}

# Run a kubectl command in `apply` mode, or print it as a YAML comment in `plan` mode.
step() {
  if [[ "$MODE" == plan ]]; then
    printf '# up runs: %s\n' "$*"
  else
    "$@"
  fi
}

check_database_secret() {
  if [[ "$MODE" == plan ]]; then
    printf '# up checks that Secret %s/%s exists\n' "$NAMESPACE" "$DATABASE_SECRET"
    return
  fi
  if ! kubectl --namespace "$NAMESPACE" get secret "$DATABASE_SECRET" >/dev/null 2>&1; then
    die "Secret $NAMESPACE/$DATABASE_SECRET not found. Create it once with:
  kubectl --namespace $NAMESPACE create secret generic $DATABASE_SECRET \\
    --from-literal=password=\"\$(openssl rand -hex 32)\""
  fi
}

# Wait for the init Job, and print its logs if it does not complete.
wait_for_init_job() {
  if [[ "$MODE" == plan ]]; then
    step kubectl --namespace "$NAMESPACE" wait --for=condition=complete \
      "job/$INIT_JOB" --timeout="$WAIT_TIMEOUT"
    return
  fi
  log "waiting for Job $INIT_JOB (work pool and deployment)"
  if ! kubectl --namespace "$NAMESPACE" wait --for=condition=complete \
    "job/$INIT_JOB" --timeout="$WAIT_TIMEOUT"; then
    kubectl --namespace "$NAMESPACE" logs "job/$INIT_JOB" --all-containers --tail=50 >&2 || true
    die "Job $INIT_JOB did not complete within $WAIT_TIMEOUT. Its logs are above."
  fi
}

wait_for_rollout() {
  local deployment="$1"
  step kubectl --namespace "$NAMESPACE" rollout status "deployment/$deployment" \
    --timeout="$WAIT_TIMEOUT"
}

# The steps of `up`, in order. Each one waits for what the next one needs.
deploy_steps() {
  apply_manifest 00-namespace.yaml
  check_database_secret
  apply_configmap

  apply_manifest 10-postgres.yaml
  wait_for_rollout postgres
  apply_manifest 20-prefect-server.yaml
  wait_for_rollout prefect-server

  # The network policies are in place before the worker can start any flow-run pod.
  apply_manifest 30-prefect-worker-rbac.yaml
  apply_manifest 40-network-policies.yaml

  step kubectl --namespace "$NAMESPACE" delete job "$INIT_JOB" --ignore-not-found --wait=true
  apply_manifest 50-prefect-init.yaml
  wait_for_init_job

  apply_manifest 60-prefect-worker.yaml
  wait_for_rollout prefect-worker
}

cmd_plan() {
  require kubectl "It generates the ConfigMap offline. K3s installs it as a link to k3s."
  MODE=plan
  deploy_steps
}

cmd_up() {
  require kubectl "K3s installs it as a link to k3s."
  deploy_steps
  log "ready. Prefect API inside the cluster:" \
    "http://prefect-server.$NAMESPACE.svc.cluster.local:4200/api"
  log "from this node: $(node_api_url)"
}

cmd_build() {
  require "$CONTAINER_TOOL" "Install podman, or set K3S_CONTAINER_TOOL=docker."
  require k3s "build imports the images into K3s's containerd on this node."

  log "building $RUNNER_IMAGE"
  "$CONTAINER_TOOL" build --tag "$RUNNER_IMAGE" --file "$REPO_DIR/flows/Dockerfile" \
    "$REPO_DIR/flows"
  log "building $WORKER_IMAGE"
  "$CONTAINER_TOOL" build --tag "$WORKER_IMAGE" "$K3S_DIR/worker"

  # The manifests use imagePullPolicy Never, so the node's containerd must hold both images.
  local image
  for image in "$RUNNER_IMAGE" "$WORKER_IMAGE"; do
    log "importing $image into K3s's containerd"
    "$CONTAINER_TOOL" save "$image" | k3s ctr --namespace k8s.io images import -
  done
}

cmd_down() {
  require kubectl "K3s installs it as a link to k3s."
  log "deleting the worker first, so it starts no new flow run"
  kubectl --namespace "$NAMESPACE" delete deployment prefect-worker --ignore-not-found
  log "deleting flow-run Jobs and the init Job"
  kubectl --namespace "$NAMESPACE" delete jobs --selector prefect.io/flow-run-id --ignore-not-found
  kubectl --namespace "$NAMESPACE" delete job "$INIT_JOB" --ignore-not-found
  log "deleting the Prefect server and Postgres (the volume postgres-data stays)"
  kubectl --namespace "$NAMESPACE" delete deployment prefect-server postgres --ignore-not-found
}

# Print the API URL that works on a K3s node, where kube-proxy routes Service addresses.
node_api_url() {
  local address
  address="$(kubectl --namespace "$NAMESPACE" get service prefect-server \
    --output 'jsonpath={.spec.clusterIP}' 2>/dev/null)" || true
  if [[ -n "$address" ]]; then
    echo "http://$address:4200/api"
  else
    echo "(Service prefect-server not found)"
  fi
}

cmd_status() {
  require kubectl "K3s installs it as a link to k3s."
  require curl "status checks the Prefect API with it."
  local ok=0

  kubectl --namespace "$NAMESPACE" get deployments,pods,jobs,pvc || ok=1

  local deployment
  for deployment in postgres prefect-server prefect-worker; do
    local ready
    ready="$(kubectl --namespace "$NAMESPACE" get deployment "$deployment" \
      --output 'jsonpath={.status.readyReplicas}' 2>/dev/null)" || true
    if [[ "${ready:-0}" -ge 1 ]]; then
      echo "$deployment: ready"
    else
      echo "$deployment: not ready"
      ok=1
    fi
  done

  local api_url
  api_url="$(node_api_url)"
  if [[ "$(curl -fsS --max-time 3 "$api_url/health" 2>/dev/null)" == "true" ]]; then
    echo "health: ok ($api_url/health)"
  else
    echo "health: unreachable from this host ($api_url/health)"
    ok=1
  fi
  if curl -fsS --max-time 5 -o /dev/null \
    "$api_url/deployments/name/python-runner/python-runner" 2>/dev/null; then
    echo "deployment: python-runner/python-runner registered"
  else
    echo "deployment: python-runner/python-runner not found"
    ok=1
  fi
  return "$ok"
}

main() {
  case "${1:-help}" in
    build) cmd_build ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    plan | --dry-run) cmd_plan ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
