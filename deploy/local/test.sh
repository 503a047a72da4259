#!/usr/bin/env bash
# Runs the whole test suite: the flow's pytest tests, the K3s deployment's offline tests, then
# the Rust unit and integration tests. The integration tests need a real Prefect server and
# worker, so this script starts a stack of its own on a separate port and state folder, with a
# fresh database, and stops it on exit.
#
# Settings (environment):
#   TEST_STACK_PORT       port of the test stack's Prefect server (default 4290)
#   TEST_STACK_STATE_DIR  state folder of the test stack (default <repo>/.state/test);
#                         deleted and recreated on every run
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
stack="$repo/deploy/local/stack.sh"

export LOCAL_STACK_HOST=127.0.0.1
export LOCAL_STACK_PORT="${TEST_STACK_PORT:-4290}"
export LOCAL_STACK_STATE_DIR="${TEST_STACK_STATE_DIR:-$repo/.state/test}"
export LOCAL_STACK_DEV=1

# Stop a stack left by an interrupted run, then start from an empty database.
"$stack" down
rm -rf "$LOCAL_STACK_STATE_DIR"
trap '"$stack" down' EXIT
"$stack" up

echo "==> flow tests (pytest)"
venv="${LOCAL_STACK_VENV:-$repo/.venv}"
(cd "$repo/flows" && "$venv/bin/python" -m pytest -q tests)

echo "==> K3s deployment tests (pytest, offline, own virtualenv .venv-k3s)"
"$repo/deploy/k3s/test.sh"

echo "==> Rust unit and integration tests"
export K3S_JOB_RUNNER_TEST_API_URL="http://$LOCAL_STACK_HOST:$LOCAL_STACK_PORT/api"
export RUST_LOG="${RUST_LOG:-warn}"
# One test at a time: the tests share one worker whose pool runs four flows at once, and the
# fault tests restart the Prefect server, so parallel tests would delay or break each other.
cargo test --manifest-path "$repo/Cargo.toml" --all-targets -- --test-threads 1

echo "==> all tests passed"
