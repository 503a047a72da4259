#!/usr/bin/env bash
# Runs the benchmarks: brings up the local stack if it is not running, then the load harness
# (events against poll mode through the real service) and the registry micro-benchmark.
# Results go to target/bench-results/. The stack keeps running afterwards; stop it with
# `deploy/local/stack.sh down`.
#
# Usage: benches/run.sh [load|registry|all] [harness options...]
#   benches/run.sh load --jobs 200 --rounds 2
#   benches/run.sh registry --runs 10000
# Settings (environment): those of deploy/local/stack.sh, such as LOCAL_STACK_PORT.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
host="${LOCAL_STACK_HOST:-127.0.0.1}"
port="${LOCAL_STACK_PORT:-4200}"
which="${1:-all}"
if [[ $# -gt 0 ]]; then
  shift
fi

case "$which" in
  load | registry | all) ;;
  -h | --help | help)
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "benches/run.sh: unknown benchmark '$which'; expected load, registry or all" >&2
    exit 2
    ;;
esac

if [[ "$which" == load || "$which" == all ]]; then
  # The plot's text needs a TrueType font; Debian ships DejaVu Sans in fonts-dejavu-core.
  if [[ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf && $EUID -eq 0 ]] &&
    command -v apt-get >/dev/null; then
    echo "==> installing fonts-dejavu-core for the plot"
    apt-get install -y fonts-dejavu-core >/dev/null || echo "benches/run.sh: no font; the plot is skipped" >&2
  fi
  "$repo/deploy/local/stack.sh" up
  echo "==> load harness (cargo bench --bench load)"
  PREFECT_API_URL="http://$host:$port/api" \
    cargo bench --manifest-path "$repo/Cargo.toml" --bench load -- "$@"
fi
if [[ "$which" == registry || "$which" == all ]]; then
  echo "==> registry micro-benchmark (cargo bench --bench registry)"
  if [[ "$which" == all ]]; then
    cargo bench --manifest-path "$repo/Cargo.toml" --bench registry
  else
    cargo bench --manifest-path "$repo/Cargo.toml" --bench registry -- "$@"
  fi
fi
