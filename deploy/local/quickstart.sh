#!/usr/bin/env bash
# Brings up the embedded stack (Prefect server on SQLite and a process worker), builds the
# service, and runs one Python job through the MCP server with a real MCP client. The stack
# keeps running afterwards; stop it with `deploy/local/stack.sh down`.
#
# Settings (environment): those of deploy/local/stack.sh, such as LOCAL_STACK_PORT.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
host="${LOCAL_STACK_HOST:-127.0.0.1}"
port="${LOCAL_STACK_PORT:-4200}"

"$repo/deploy/local/stack.sh" up

echo "==> building k3s-job-runner (release)"
cargo build --release --manifest-path "$repo/Cargo.toml"

echo "==> running print(sum(range(10))) through the MCP server"
PREFECT_API_URL="http://$host:$port/api" \
    "$repo/target/release/k3s-job-runner" call --code 'print(sum(range(10)))'

cat <<TEXT
==> done. The stack is still running at http://$host:$port (Prefect UI and API).
    Run a job:   PREFECT_API_URL=http://$host:$port/api target/release/k3s-job-runner call --code 'print("hi")'
    Stop it:     deploy/local/stack.sh down
TEXT
