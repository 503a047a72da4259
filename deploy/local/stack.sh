#!/usr/bin/env bash
# Start, stop and inspect a local Prefect stack for k3s-job-runner: a Prefect server backed by
# SQLite, a `process` work pool with one worker, and the `python-runner` deployment.
#
# Usage: deploy/local/stack.sh up|down|status|restart-server|help
#
# Settings, read from the environment:
#   LOCAL_STACK_HOST        address the Prefect server listens on (default 127.0.0.1)
#   LOCAL_STACK_PORT        TCP port of the Prefect server (default 4200)
#   LOCAL_STACK_STATE_DIR   directory for the database, Prefect home, pid files and logs
#                           (default <repo>/.state/local)
#   LOCAL_STACK_VENV        virtualenv that gets flows/requirements.txt (default <repo>/.venv)
#   LOCAL_STACK_POOL        name of the process work pool (default local-process)
#   LOCAL_STACK_DEPLOYMENT  name of the deployment of the python-runner flow
#                           (default python-runner)
#   LOCAL_STACK_PYTHON      interpreter that creates the virtualenv (default python3)
#   LOCAL_STACK_DEV         1 also installs flows/requirements-dev.txt, for the tests (default 0)
#   LOCAL_STACK_CONCURRENCY flow runs the pool runs at once; later ones wait (default 4)
#   LOCAL_STACK_SANDBOX     bubblewrap (default) runs submitted code in a bubblewrap sandbox,
#                           installing the package with apt-get when root and `bwrap` is
#                           missing; none runs it without isolation (the worker gets
#                           PYTHON_RUNNER_SANDBOX=none)
#
# `up` is idempotent: processes whose pid files point at live processes are left running.
# `down` stops only the process groups that `up` recorded, and the flow runs their worker
# started.

set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FLOWS_DIR="$REPO_DIR/flows"

HOST="${LOCAL_STACK_HOST:-127.0.0.1}"
PORT="${LOCAL_STACK_PORT:-4200}"
STATE_DIR="${LOCAL_STACK_STATE_DIR:-$REPO_DIR/.state/local}"
VENV="${LOCAL_STACK_VENV:-$REPO_DIR/.venv}"
POOL="${LOCAL_STACK_POOL:-local-process}"
DEPLOYMENT="${LOCAL_STACK_DEPLOYMENT:-python-runner}"
PYTHON="${LOCAL_STACK_PYTHON:-python3}"
DEV="${LOCAL_STACK_DEV:-0}"
CONCURRENCY="${LOCAL_STACK_CONCURRENCY:-4}"
SANDBOX="${LOCAL_STACK_SANDBOX:-bubblewrap}"

FLOW_NAME="python-runner"
API_URL="http://$HOST:$PORT/api"
LOG_DIR="$STATE_DIR/logs"
SERVER_PID_FILE="$STATE_DIR/server.pid"
WORKER_PID_FILE="$STATE_DIR/worker.pid"
WORKER_NAME_FILE="$STATE_DIR/worker.name"
REQUIREMENTS_STAMP="$VENV/.k3s-job-runner-requirements.sha256"

# Seconds to wait for the server's health check, for the worker to register, and for a
# process group to exit after SIGTERM. NOTE: the Prefect 3.9.1 worker did not exit within 60 s
# of SIGTERM or SIGINT here, so `down` always ends it with SIGKILL after STOP_TIMEOUT.
SERVER_START_TIMEOUT=120
WORKER_START_TIMEOUT=60
STOP_TIMEOUT=5

usage() {
  cat <<EOF
Usage: $0 up|down|status|restart-server|help

  up      create the virtualenv if needed, start the Prefect server and a process worker,
          create the work pool and register the deployment
  down    stop the server, the worker and the flow runs the worker started
  status  show whether the recorded processes run, the server's health and the deployment
  restart-server
          stop and start only the Prefect server, keeping the worker and the database, as
          a server upgrade or crash would

Settings (environment variables):
  LOCAL_STACK_HOST        address the Prefect server listens on (default 127.0.0.1)
  LOCAL_STACK_PORT        TCP port of the Prefect server (default 4200)
  LOCAL_STACK_STATE_DIR   directory for the database, Prefect home, pid files and logs
                          (default <repo>/.state/local)
  LOCAL_STACK_VENV        virtualenv that gets flows/requirements.txt (default <repo>/.venv)
  LOCAL_STACK_POOL        name of the process work pool (default local-process)
  LOCAL_STACK_DEPLOYMENT  name of the python-runner deployment (default python-runner)
  LOCAL_STACK_PYTHON      interpreter that creates the virtualenv (default python3)
  LOCAL_STACK_DEV         1 also installs flows/requirements-dev.txt (default 0)
  LOCAL_STACK_CONCURRENCY flow runs the pool runs at once; later ones wait (default 4)
  LOCAL_STACK_SANDBOX     bubblewrap (default): run submitted code in a bubblewrap sandbox;
                          \`up\` installs bubblewrap with apt-get when root and bwrap is
                          missing. none: run it without isolation. A running worker keeps
                          the value it started with; run \`down\` first to change it.
EOF
}

log() {
  echo "stack: $*" >&2
}

die() {
  log "error: $*"
  exit 1
}

# Point every Prefect command at this stack's own home, database and server.
export_prefect_env() {
  export PREFECT_HOME="$STATE_DIR/prefect-home"
  export PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$STATE_DIR/prefect.db"
  export PREFECT_SERVER_ANALYTICS_ENABLED=false
  export PREFECT_API_URL="$API_URL"
  # The worker and the flow engines retry 429, 502 and 503 responses this many times (Prefect's
  # default is 5), to ride out SQLite lock contention under bursts of runs.
  export PREFECT_CLIENT_MAX_RETRIES=10
  # The worker starts flow runs with its own interpreter. With the virtualenv first on PATH,
  # `prefect` and `python` also resolve to the virtualenv.
  export PATH="$VENV/bin:$PATH"
}

# Install bubblewrap when the sandbox is on and `bwrap` is missing. Only root can install it.
ensure_bubblewrap() {
  case "$SANDBOX" in
    none)
      log "sandbox disabled (LOCAL_STACK_SANDBOX=none): submitted code runs without isolation"
      return
      ;;
    bubblewrap) ;;
    *) die "LOCAL_STACK_SANDBOX must be bubblewrap or none, got '$SANDBOX'" ;;
  esac
  if command -v bwrap >/dev/null; then
    return
  fi
  if [[ "$(id -u)" != "0" ]]; then
    die "bubblewrap (bwrap) is not installed; install it as root (Debian and Ubuntu:" \
      "sudo apt-get install bubblewrap; Fedora: sudo dnf install bubblewrap), or set" \
      "LOCAL_STACK_SANDBOX=none to run submitted code without a sandbox"
  fi
  command -v apt-get >/dev/null ||
    die "bubblewrap (bwrap) is not installed and apt-get is missing; install bubblewrap" \
      "with the system's package manager, or set LOCAL_STACK_SANDBOX=none"
  log "installing bubblewrap with apt-get (log: $LOG_DIR/setup.log)"
  # The package lists may be missing or stale on a fresh machine, so update them on failure.
  if ! apt-get install -y bubblewrap >>"$LOG_DIR/setup.log" 2>&1; then
    apt-get update >>"$LOG_DIR/setup.log" 2>&1 ||
      die "apt-get update failed; see $LOG_DIR/setup.log"
    apt-get install -y bubblewrap >>"$LOG_DIR/setup.log" 2>&1 ||
      die "apt-get install bubblewrap failed; see $LOG_DIR/setup.log"
  fi
}

# Run one job through the runner, so a sandbox that cannot start (user namespaces refused,
# for example) fails here with the runner's own message rather than on every submitted job.
check_sandbox() {
  [[ "$SANDBOX" == "none" ]] && return
  local message
  if ! message="$(cd "$FLOWS_DIR" && PYTHON_RUNNER_SANDBOX="$SANDBOX" "$VENV/bin/python" -c '
import sys
from python_runner import RunnerError, run_code
try:
    result = run_code("print(1)", 30)
except RunnerError as error:
    sys.exit(str(error))
if result.stdout != "1\n":
    sys.exit(f"the sandbox test job returned {result.to_payload()}")
' 2>&1)"; then
    die "the sandbox does not work on this machine: $message"
  fi
  log "sandbox check passed (bubblewrap)"
}

requirements_hash() {
  local files=("$FLOWS_DIR/requirements.txt")
  if [[ "$DEV" == "1" ]]; then
    files+=("$FLOWS_DIR/requirements-dev.txt")
  fi
  cat "${files[@]}" | sha256sum | cut -d' ' -f1
}

ensure_venv() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
  fi

  local wanted
  wanted="$(requirements_hash)"
  if [[ -f "$REQUIREMENTS_STAMP" && "$(cat "$REQUIREMENTS_STAMP")" == "$wanted" ]]; then
    return
  fi

  local requirements="$FLOWS_DIR/requirements.txt"
  if [[ "$DEV" == "1" ]]; then
    requirements="$FLOWS_DIR/requirements-dev.txt"
  fi
  log "installing $requirements into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$wanted" >"$REQUIREMENTS_STAMP"
}

# Print the pid recorded in a pid file, or nothing if the file is missing or empty.
recorded_pid() {
  local pid_file="$1"
  if [[ -s "$pid_file" ]]; then
    tr -d '[:space:]' <"$pid_file"
  fi
}

# Succeed if the pid file names a live process that leads its own process group and runs
# Prefect, so a pid reused by an unrelated process is never signalled.
recorded_process_alive() {
  local pid
  pid="$(recorded_pid "$1")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1

  local pgid
  pgid="$(ps -o pgid= -p "$pid" | tr -d '[:space:]')"
  [[ "$pgid" == "$pid" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q prefect
}

server_healthy() {
  [[ "$(curl -fsS --max-time 3 "$API_URL/health" 2>/dev/null)" == "true" ]]
}

deployment_id() {
  curl -fsS --max-time 5 "$API_URL/deployments/name/$FLOW_NAME/$DEPLOYMENT" 2>/dev/null |
    "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["id"])' 2>/dev/null
}

pool_exists() {
  curl -fsS --max-time 5 -o /dev/null "$API_URL/work_pools/$POOL" 2>/dev/null
}

# Succeed if the pool lists a worker with this name as ONLINE.
worker_online() {
  local name="$1"
  curl -fsS --max-time 5 -X POST -H 'Content-Type: application/json' -d '{}' \
    "$API_URL/work_pools/$POOL/workers/filter" 2>/dev/null |
    WORKER_NAME="$name" "$VENV/bin/python" -c '
import json, os, sys
workers = json.load(sys.stdin)
name = os.environ["WORKER_NAME"]
sys.exit(0 if any(w["name"] == name and w["status"] == "ONLINE" for w in workers) else 1)
' 2>/dev/null
}

# Start a command in a new session, so it and its children form one process group that
# `down` can signal, and record the group's id (the leader's pid) in a pid file.
start_in_new_session() {
  local pid_file="$1" log_file="$2"
  shift 2
  # Closing descriptor 9 keeps the long-running process from holding the stack lock.
  setsid "$@" </dev/null >>"$log_file" 2>&1 9>&- &
  local pid=$!

  # A non-interactive shell runs background jobs in its own process group, so setsid does
  # not need to fork and $! is the new group's leader.
  sleep 0.2
  local pgid
  pgid="$(ps -o pgid= -p "$pid" | tr -d '[:space:]')"
  if [[ "$pgid" != "$pid" ]]; then
    die "process $pid started for $pid_file does not lead its process group; see $log_file"
  fi
  echo "$pid" >"$pid_file"
}

start_server() {
  if recorded_process_alive "$SERVER_PID_FILE" && server_healthy; then
    log "server already running (pid $(recorded_pid "$SERVER_PID_FILE")) at $API_URL"
    return
  fi
  if recorded_process_alive "$SERVER_PID_FILE"; then
    log "server process $(recorded_pid "$SERVER_PID_FILE") is alive but not healthy yet"
  else
    if server_healthy; then
      die "a Prefect server not started by this script is already running at $API_URL;" \
        "stop it or set LOCAL_STACK_PORT to a free port"
    fi
    log "starting Prefect server at $API_URL (log: $LOG_DIR/server.log)"
    start_in_new_session "$SERVER_PID_FILE" "$LOG_DIR/server.log" \
      prefect server start --host "$HOST" --port "$PORT"
  fi
  wait_for_server
}

wait_for_server() {
  local deadline=$((SECONDS + SERVER_START_TIMEOUT))
  until server_healthy; do
    if ! recorded_process_alive "$SERVER_PID_FILE"; then
      die "the Prefect server exited during startup; see $LOG_DIR/server.log"
    fi
    if ((SECONDS >= deadline)); then
      die "the Prefect server at $API_URL was not healthy within ${SERVER_START_TIMEOUT} s;" \
        "see $LOG_DIR/server.log"
    fi
    sleep 1
  done
  log "server healthy at $API_URL"
}

ensure_pool() {
  if ! pool_exists; then
    log "creating process work pool $POOL"
    # A pool created concurrently makes the command fail, so only a missing pool is an error.
    if ! prefect work-pool create "$POOL" --type process >>"$LOG_DIR/setup.log" 2>&1; then
      pool_exists || die "failed to create work pool $POOL; see $LOG_DIR/setup.log"
    fi
  fi
  # Runs beyond the limit wait in Scheduled until a slot frees. Without a limit, a burst of
  # runs starts one engine process each at once and their writes overload SQLite, which
  # returns 503 until the worker gives up and marks runs Crashed.
  log "limiting pool $POOL to $CONCURRENCY concurrent flow runs"
  prefect work-pool set-concurrency-limit "$POOL" "$CONCURRENCY" >>"$LOG_DIR/setup.log" 2>&1 ||
    die "failed to set the concurrency limit of work pool $POOL; see $LOG_DIR/setup.log"
}

register_deployment() {
  log "registering deployment $FLOW_NAME/$DEPLOYMENT on pool $POOL"
  if ! python "$FLOWS_DIR/deploy.py" --pool "$POOL" --name "$DEPLOYMENT" \
    >>"$LOG_DIR/setup.log" 2>&1; then
    die "failed to register the deployment; see $LOG_DIR/setup.log"
  fi
}

start_worker() {
  if recorded_process_alive "$WORKER_PID_FILE"; then
    log "worker already running (pid $(recorded_pid "$WORKER_PID_FILE"))"
    return
  fi

  # A fresh name per start, so an old worker's record in the database does not count as
  # this worker being online.
  local name
  name="$POOL-worker-$(date +%s)-$$"
  echo "$name" >"$WORKER_NAME_FILE"
  log "starting worker $name on pool $POOL (log: $LOG_DIR/worker.log)"
  # Poll the pool every second instead of every 10 s, so a submitted run starts sooner.
  # Flow runs inherit the worker's environment, which is where the runner reads its settings.
  start_in_new_session "$WORKER_PID_FILE" "$LOG_DIR/worker.log" \
    env PREFECT_WORKER_QUERY_SECONDS=1 PYTHON_RUNNER_SANDBOX="$SANDBOX" \
    prefect worker start --pool "$POOL" --name "$name"
  wait_for_worker "$name"
}

wait_for_worker() {
  local name="$1"
  local deadline=$((SECONDS + WORKER_START_TIMEOUT))
  until worker_online "$name"; do
    if ! recorded_process_alive "$WORKER_PID_FILE"; then
      die "the worker exited during startup; see $LOG_DIR/worker.log"
    fi
    if ((SECONDS >= deadline)); then
      die "worker $name did not come online within ${WORKER_START_TIMEOUT} s;" \
        "see $LOG_DIR/worker.log"
    fi
    sleep 1
  done
  log "worker $name online"
}

cmd_up() {
  command -v curl >/dev/null || die "curl is required but not installed"
  mkdir -p "$STATE_DIR" "$LOG_DIR"
  exec 9>"$STATE_DIR/stack.lock"
  flock -w 300 9 || die "timed out after 300 s waiting for another stack.sh to release" \
    "$STATE_DIR/stack.lock"

  ensure_bubblewrap
  ensure_venv
  export_prefect_env
  check_sandbox
  start_server
  ensure_pool
  register_deployment
  start_worker

  local id
  id="$(deployment_id)" || die "deployment $FLOW_NAME/$DEPLOYMENT not found after registering"
  log "deployment $FLOW_NAME/$DEPLOYMENT: $id"
  echo "PREFECT_API_URL=$API_URL"
}

# Print the process group ids of every descendant of `root` that left root's group. Flow runs
# started by the worker run in their own sessions, so signalling the worker's group misses them.
descendant_groups() {
  local root="$1"
  ps -e -o pid=,ppid=,pgid= | awk -v root="$root" '
    { parent[$1] = $2; group[$1] = $3 }
    END {
      for (pid in parent) {
        p = parent[pid]
        while (p != "" && p != 0 && p != root) p = parent[p]
        if (p == root && group[pid] != root) print group[pid]
      }
    }' | sort -u
}

group_alive() {
  kill -0 -- "-$1" 2>/dev/null
}

# Send SIGTERM to each process group, wait up to STOP_TIMEOUT seconds, then SIGKILL the rest.
stop_groups() {
  local pgid
  for pgid in "$@"; do
    kill -TERM -- "-$pgid" 2>/dev/null || true
  done

  local deadline=$((SECONDS + STOP_TIMEOUT))
  for pgid in "$@"; do
    while group_alive "$pgid" && ((SECONDS < deadline)); do
      sleep 0.2
    done
    if group_alive "$pgid"; then
      log "process group $pgid still running after ${STOP_TIMEOUT} s; sending SIGKILL"
      kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
  done
}

stop_recorded() {
  local label="$1" pid_file="$2"
  if recorded_process_alive "$pid_file"; then
    local pid groups
    pid="$(recorded_pid "$pid_file")"
    groups="$(descendant_groups "$pid")"
    log "stopping $label (process group $pid${groups:+, flow run groups $(echo "$groups" | xargs)})"
    # shellcheck disable=SC2086 # one process group id per word
    stop_groups "$pid" $groups
  else
    log "$label not running"
  fi
  rm -f "$pid_file"
}

cmd_restart_server() {
  [[ -f "$SERVER_PID_FILE" ]] || die "no server recorded in $STATE_DIR; run \`$0 up\` first"
  mkdir -p "$LOG_DIR"
  exec 9>"$STATE_DIR/stack.lock"
  flock -w 300 9 || die "timed out after 300 s waiting for another stack.sh to release" \
    "$STATE_DIR/stack.lock"

  export_prefect_env
  stop_recorded server "$SERVER_PID_FILE"
  start_server
}

cmd_down() {
  stop_recorded worker "$WORKER_PID_FILE"
  stop_recorded server "$SERVER_PID_FILE"
  rm -f "$WORKER_NAME_FILE"
}

cmd_status() {
  local ok=0 label pid_file
  for label in server worker; do
    pid_file="$STATE_DIR/$label.pid"
    if recorded_process_alive "$pid_file"; then
      echo "$label: running (pid $(recorded_pid "$pid_file"))"
    else
      echo "$label: not running"
      ok=1
    fi
  done

  if server_healthy; then
    echo "health: ok ($API_URL/health)"
  else
    echo "health: unreachable ($API_URL/health)"
    ok=1
  fi

  local id
  if [[ -x "$VENV/bin/python" ]] && id="$(deployment_id)"; then
    echo "deployment: $FLOW_NAME/$DEPLOYMENT ($id)"
  else
    echo "deployment: $FLOW_NAME/$DEPLOYMENT not found"
    ok=1
  fi
  return "$ok"
}

main() {
  case "${1:-help}" in
    up) cmd_up ;;
    down) cmd_down ;;
    restart-server) cmd_restart_server ;;
    status) cmd_status ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
