"""Checks of the two Dockerfiles and of the versions they pin."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

from conftest import K3S_DIR, REPO_DIR, SERVER_IMAGE

RUNNER_DOCKERFILE = REPO_DIR / "flows" / "Dockerfile"
WORKER_DOCKERFILE = K3S_DIR / "worker" / "Dockerfile"
TEST_REQUIREMENTS = K3S_DIR / "requirements-test.txt"
FLOW_REQUIREMENTS = REPO_DIR / "flows" / "requirements.txt"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """Parse a Dockerfile into (INSTRUCTION, arguments), joining continued lines."""
    parsed: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        parsed.append((keyword.upper(), arguments.strip()))
        pending = ""
    return parsed


def arguments_of(dockerfile: Path, keyword: str) -> list[str]:
    return [arguments for name, arguments in instructions(dockerfile) if name == keyword]


def pins(text: str) -> dict[str, str]:
    """Map each `name==version` requirement in a requirements file or command to its version."""
    return {
        name.lower(): pinned
        for name, pinned in re.findall(r"^\s*([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE)
    }


def test_runner_image_has_no_entrypoint():
    assert arguments_of(RUNNER_DOCKERFILE, "ENTRYPOINT") == []


def test_runner_image_runs_as_uid_1000():
    assert arguments_of(RUNNER_DOCKERFILE, "USER")[-1] == "1000:1000"


def test_runner_base_image_pinned_python_312():
    (base,) = arguments_of(RUNNER_DOCKERFILE, "FROM")

    assert re.fullmatch(r"docker\.io/library/python:3\.12\.\d+-slim-\w+", base), base


def test_runner_image_bakes_flow_in():
    copied = " ".join(arguments_of(RUNNER_DOCKERFILE, "COPY"))

    assert "python_runner.py" in copied
    assert "deploy.py" in copied
    assert "/opt/flows/" in copied
    assert arguments_of(RUNNER_DOCKERFILE, "WORKDIR") == ["/opt/flows"]


def test_runner_prefect_matches_server():
    server_version = SERVER_IMAGE.rsplit(":", 1)[1].split("-")[0]

    assert pins(FLOW_REQUIREMENTS.read_text())["prefect"] == server_version


def test_worker_image_based_on_server_image():
    (base,) = arguments_of(WORKER_DOCKERFILE, "FROM")

    assert base == SERVER_IMAGE
    assert arguments_of(WORKER_DOCKERFILE, "USER")[-1] == "1000:1000"


def test_worker_pins_match_test_requirements():
    installed = pins("\n".join(" ".join(arguments_of(WORKER_DOCKERFILE, "RUN")).split()))
    tested = pins(TEST_REQUIREMENTS.read_text())

    assert installed["prefect-kubernetes"] == tested["prefect-kubernetes"]
    assert installed["prefect"] == tested["prefect"]


def test_tests_run_pinned_versions():
    tested = pins(TEST_REQUIREMENTS.read_text())

    assert version("prefect") == tested["prefect"]
    assert version("prefect-kubernetes") == tested["prefect-kubernetes"]
    assert version("kubernetes-validate") == tested["kubernetes-validate"]
