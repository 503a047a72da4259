#!/usr/bin/env bash
# Runs the offline tests of the K3s deployment (deploy/k3s/tests): manifest validation, the
# Job that the pinned prefect-kubernetes renders from base-job-template.json, the worker's
# Role, the Dockerfiles and run.sh. Needs no cluster, no container tool and no Prefect server.
#
# The tests get their own virtualenv, because they pin prefect-kubernetes, which the local
# stack does not use. It is reinstalled only when requirements-test.txt changes. shellcheck is
# installed with apt-get when it is missing and this runs as root.
#
# Settings (environment):
#   K3S_TEST_VENV     virtualenv of the tests (default <repo>/.venv-k3s)
#   K3S_TEST_PYTHON   interpreter that creates it (default python3)
set -euo pipefail

k3s_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$k3s_dir/../.." && pwd)
venv="${K3S_TEST_VENV:-$repo/.venv-k3s}"
requirements="$k3s_dir/requirements-test.txt"
stamp="$venv/.requirements-test.sha256"

if ! command -v shellcheck >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "==> installing shellcheck with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q shellcheck >/dev/null ||
      { apt-get update -q >/dev/null && apt-get install -y -q shellcheck >/dev/null; }
  else
    echo "warning: shellcheck is missing, so the run.sh check will fail." \
      "Install it with \`apt-get install shellcheck\`." >&2
  fi
fi

if [[ ! -x "$venv/bin/python" ]]; then
  "${K3S_TEST_PYTHON:-python3}" -m venv "$venv"
fi
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
  echo "==> installing $requirements into $venv"
  started=$SECONDS
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$wanted" >"$stamp"
  echo "    installed in $((SECONDS - started)) s"
fi

cd "$k3s_dir"
exec "$venv/bin/python" -m pytest -q tests
