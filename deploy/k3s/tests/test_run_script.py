"""Checks of deploy/k3s/run.sh that need no cluster."""

from __future__ import annotations

import re
import shutil
import subprocess

from conftest import RUN_SCRIPT, RUNNER_IMAGE, TEMPLATE_FILE, WORKER_IMAGE


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RUN_SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_run_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, (
        "shellcheck is not installed: install it with `apt-get install -y shellcheck`"
        " (deploy/local/test.sh does this when run as root)"
    )

    result = subprocess.run(
        [shellcheck, str(RUN_SCRIPT)], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout


def test_help_lists_commands():
    result = run_script("help")

    assert result.returncode == 0
    for command in ("build", "up", "down", "status", "plan"):
        assert re.search(rf"^  {command} ", result.stdout, re.MULTILINE), command


def test_unknown_command_exits_2():
    result = run_script("deploy-everything")

    assert result.returncode == 2
    assert "Usage:" in result.stderr


def test_image_names_match_manifests():
    text = RUN_SCRIPT.read_text()
    tag = re.search(r"^IMAGE_TAG=(\S+)$", text, re.MULTILINE).group(1)

    assert 'RUNNER_IMAGE="localhost/k3s-job-runner/python-runner:$IMAGE_TAG"' in text
    assert 'WORKER_IMAGE="localhost/k3s-job-runner/prefect-worker:$IMAGE_TAG"' in text
    assert RUNNER_IMAGE.endswith(f":{tag}")
    assert WORKER_IMAGE.endswith(f":{tag}")
    assert RUNNER_IMAGE in TEMPLATE_FILE.read_text()


def test_plan_prints_without_cluster(plan_output):
    assert "# deploy/k3s/00-namespace.yaml" in plan_output
    assert "# up checks that Secret atlas/prefect-postgres exists" in plan_output
