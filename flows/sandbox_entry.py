"""Entry point of the child interpreter that runs submitted code.

The runner starts `python -I -B sandbox_entry.py CONFIG`, inside the sandbox or not, where
CONFIG is a JSON object with `script`, `status_fd` and `limits`. This module applies the
resource limits to its own process, then runs the script as `__main__` in the same
interpreter, so the limits hold for the submitted code and everything it starts.

It writes one line per event to the status pipe `status_fd`, which the runner reads after the
child has exited:

- `started` right before the submitted code runs, so the runner can tell a sandbox that
  failed to start from code that failed;
- `exit N` when the code raises SystemExit, so a voluntary exit code above 128 is not taken
  for a death by signal N - 128 (bubblewrap reports that as 128 + N);
- `memory-error` when a MemoryError reaches the top level.

The code can write to the pipe too, but that only changes the report of its own run.

Only the standard library is used: this file runs under the base interpreter, without the
worker's virtualenv.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import types
from collections.abc import Mapping
from typing import Any

STATUS_STARTED = "started"
STATUS_EXIT = "exit"
STATUS_MEMORY_ERROR = "memory-error"

# Exit code of the interpreter when an exception other than SystemExit ends the script.
UNCAUGHT_EXCEPTION_EXIT_CODE = 1
# Freed when a MemoryError reaches the top level, so printing the traceback can allocate.
MEMORY_RESERVE_BYTES = 1024 * 1024
MIB = 1024 * 1024
STDERR_FD = 2


def main(argv: list[str]) -> None:
    """Apply the limits configured in `argv[1]`, a JSON object, then run its script."""
    config = json.loads(argv[1])
    status_fd = int(config["status_fd"])
    # The submitted code's own child processes do not get the pipe, and a pipe the code
    # filled makes a status write fail instead of blocking.
    os.set_inheritable(status_fd, False)
    os.set_blocking(status_fd, False)
    apply_limits(config["limits"])
    flush_output_on_signals((signal.SIGTERM, signal.SIGXCPU))
    run_script(config["script"], status_fd)


def apply_limits(limits: Mapping[str, Any]) -> None:
    """Set the soft and hard resource limits named in `limits`; a missing or null one is skipped.

    The hard limit equals the soft one, so the code cannot raise either.
    """
    _set_limit(resource.RLIMIT_AS, _mib_to_bytes(limits.get("memory_mib")))
    _set_limit(resource.RLIMIT_FSIZE, _mib_to_bytes(limits.get("max_file_mib")))
    _set_limit(resource.RLIMIT_NPROC, limits.get("max_processes"))
    cpu_seconds = limits.get("cpu_seconds")
    if cpu_seconds is not None:
        # SIGXCPU at the soft limit lets the handler below flush the output; SIGKILL follows
        # one second later at the hard limit.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    # A core file would fill the private /tmp, or reach a core handler outside the sandbox.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _mib_to_bytes(mib: int | None) -> int | None:
    return None if mib is None else mib * MIB


def _set_limit(which: int, value: int | None) -> None:
    if value is not None:
        resource.setrlimit(which, (value, value))


def flush_output_on_signals(signals: tuple[signal.Signals, ...]) -> None:
    """Flush stdout and stderr before each of `signals` ends the process.

    Python buffers stdout written to a pipe, so without this, output that the code printed
    before the runner's SIGTERM at the timeout would be lost. After flushing, the process dies
    by the same signal, as it would without the handler. Code that installs its own handler
    replaces this one.
    """

    def flush_then_die(signum: int, _frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            # RuntimeError: the signal arrived inside a write to the same stream.
            except (OSError, ValueError, RuntimeError):
                pass
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for signum in signals:
        signal.signal(signum, flush_then_die)


def run_script(path: str, status_fd: int) -> None:
    """Run the file at `path` as the `__main__` module, as `python path` would.

    A traceback leaves out this module's frame. Raises SystemExit with the exit code the
    interpreter would have used.
    """
    with open(path, "rb") as script:
        source = script.read()
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__cached__ = None
    sys.modules["__main__"] = module
    sys.argv = [path]
    reserve = bytearray(MEMORY_RESERVE_BYTES)

    write_status(status_fd, STATUS_STARTED)
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except SystemExit as exit_request:
        write_status(status_fd, f"{STATUS_EXIT} {exit_code_of(exit_request)}")
        raise
    except MemoryError as error:
        del reserve
        write_status(status_fd, STATUS_MEMORY_ERROR)
        print_user_traceback(error)
        raise SystemExit(UNCAUGHT_EXCEPTION_EXIT_CODE) from None
    # Any other exception ends the script the way the interpreter ends it: traceback, exit 1.
    except BaseException as error:
        print_user_traceback(error)
        raise SystemExit(UNCAUGHT_EXCEPTION_EXIT_CODE) from None


def exit_code_of(exit_request: SystemExit) -> int:
    """Return the process exit status that the interpreter derives from `exit_request`."""
    code = exit_request.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    # The interpreter prints any other object to stderr and exits with 1.
    return 1


def print_user_traceback(error: BaseException) -> None:
    """Print `error` through `sys.excepthook`, without this module's frame."""
    if error.__traceback__ is not None:
        # The default hook prints the exception's own traceback, not its third argument.
        error = error.with_traceback(error.__traceback__.tb_next)
    try:
        sys.excepthook(type(error), error, error.__traceback__)
    except MemoryError:
        # Printing needs memory too. The status line already records the outcome.
        try:
            os.write(STDERR_FD, b"MemoryError\n")
        except OSError:
            pass


def write_status(status_fd: int, line: str) -> None:
    """Write one line to the status pipe, ignoring a pipe that the code closed or filled."""
    try:
        os.write(status_fd, f"{line}\n".encode())
    except OSError:
        pass


if __name__ == "__main__":
    main(sys.argv)
