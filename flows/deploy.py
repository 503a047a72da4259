"""Register the `python-runner` deployment with the Prefect server at PREFECT_API_URL.

The deployment points at this directory on the local filesystem, so a process worker on the
same machine loads the flow from here. With `--image`, flow runs start in that container image,
which must hold this directory at the same path (flows/Dockerfile puts it at /opt/flows).
Nothing is built or pushed, and no internet access is needed. Prints the deployment id.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

FLOWS_DIR = Path(__file__).resolve().parent
ENTRYPOINT = "python_runner.py:python_runner"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--pool",
        default="local-process",
        help="work pool to run the flow on (default: %(default)s)",
    )
    parser.add_argument(
        "--name", default="python-runner", help="deployment name (default: %(default)s)"
    )
    parser.add_argument(
        "--image",
        default=None,
        help="container image of the flow runs, for pools with an `image` job variable such"
        " as kubernetes (default: none, for process pools)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    runner_flow = flow.from_source(source=str(FLOWS_DIR), entrypoint=ENTRYPOINT)
    deployment_id = runner_flow.deploy(
        name=args.name,
        work_pool_name=args.pool,
        image=args.image,
        build=False,
        push=False,
        description="Runs submitted Python code in a child process and stores the result.",
        print_next_steps=False,
    )
    print(deployment_id)


if __name__ == "__main__":
    main()
