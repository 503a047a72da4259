"""Prefect flow `python-runner`: run submitted Python code in a child process.

What the flow guarantees:

- The code runs once (no retries) in a separate interpreter started as `python -I -B main.py`
  inside a fresh temporary directory, never in the flow's own process. That directory is its
  working directory, HOME and TMPDIR, and it is removed afterwards.
- The child gets an empty stdin, so `input()` raises EOFError at once, and an environment
  built from an allowlist. Nothing from the worker's environment (no `PREFECT_*`) is passed on.
- stdout and stderr are captured separately and decoded as UTF-8, with invalid bytes replaced
  by U+FFFD. Each stream keeps at most `PYTHON_RUNNER_MAX_OUTPUT_CHARS` characters and is then
  marked as truncated. Output is read as it arrives, also past the limit, so the child does not
  block on a full pipe.
- At `timeout_seconds` the child's process group gets SIGTERM, then SIGKILL after a grace
  period. After a normal exit the process group is killed too, so background processes the
  code started do not outlive the run. NOTE: a process that moves itself to another session
  or process group (setsid, daemonizing) escapes both.
- Output that the child still holds in its own stdio buffer when it is killed is lost, because
  Python's stdout to a pipe is block-buffered and SIGTERM's default action does not flush it.
- The result is stored as the flow run's artifact `python-runner-result`, whose `data` is a
  JSON object (see `RunResult.to_payload`), and is also the flow's return value.
- The flow run ends Completed whenever the code ran, whatever its exit code and also after a
  timeout. It fails only when the runner itself breaks, for example when the interpreter
  cannot be started.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

RESULT_ARTIFACT_KEY = "python-runner-result"
RESULT_VERSION = 1

DEFAULT_MAX_OUTPUT_CHARS = 100_000
DEFAULT_KILL_GRACE_SECONDS = 2.0

# PATH for the child: system directories only, never the worker's virtualenv.
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
SCRIPT_NAME = "main.py"
READ_CHUNK_BYTES = 64 * 1024
# How long to wait for the reader threads after the child's process group was killed. A process
# that left the group (for example with setsid) can keep a pipe open for longer than that.
READER_JOIN_SECONDS = 2.0
# Maximum sleep between checks while waiting for the child to exit.
MAX_POLL_INTERVAL_SECONDS = 0.05

# From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1


class RunnerError(RuntimeError):
    """The runner could not run the code, as opposed to the code failing."""


@dataclass(frozen=True)
class RunnerSettings:
    """Settings of the runner, read from the worker's environment."""

    interpreter: str = sys.executable
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    kill_grace_seconds: float = DEFAULT_KILL_GRACE_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RunnerSettings:
        """Read `PYTHON_RUNNER_*` variables, using the defaults for those that are unset.

        Raises ValueError when a variable is set to an invalid value.
        """
        return cls(
            interpreter=environ.get("PYTHON_RUNNER_INTERPRETER") or sys.executable,
            max_output_chars=_read_positive_int(
                environ, "PYTHON_RUNNER_MAX_OUTPUT_CHARS", DEFAULT_MAX_OUTPUT_CHARS
            ),
            kill_grace_seconds=_read_non_negative_float(
                environ, "PYTHON_RUNNER_KILL_GRACE_SECONDS", DEFAULT_KILL_GRACE_SECONDS
            ),
        )


def _read_positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _read_non_negative_float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"{name} must be zero or more seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class RunResult:
    """Outcome of one run of the submitted code."""

    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: int
    timed_out: bool

    def to_payload(self) -> dict[str, Any]:
        """Build the JSON object stored in the result artifact.

        `exit_code` is the child's return code: a negative value -N means the child was killed
        by signal N, as reported by `subprocess.Popen.returncode`.
        """
        return {
            "version": RESULT_VERSION,
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "duration_ms": self.duration_ms,
            "timed_out": self.timed_out,
        }


class OutputCapture:
    """Decoded text of one output stream, cut after a maximum number of characters.

    Bytes are decoded incrementally, so a multi-byte character split across two reads is
    decoded whole, and invalid bytes become U+FFFD. Once the limit is reached, later data is
    dropped without being decoded. Memory use is bounded by the limit plus one decoded read.
    """

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.truncated = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self._size = 0
        self._lock = threading.Lock()

    def feed(self, data: bytes, final: bool = False) -> None:
        """Decode `data` and keep as much of it as the limit allows."""
        with self._lock:
            if self.truncated:
                return
            text = self._decoder.decode(data, final)
            room = self.max_chars - self._size
            if len(text) > room:
                # Slicing a str cuts between code points, never inside a character's bytes.
                text = text[:room]
                self.truncated = True
            self._parts.append(text)
            self._size += len(text)

    def text(self) -> str:
        """Return the kept text, followed by the truncation marker if data was dropped."""
        with self._lock:
            output = "".join(self._parts)
            if self.truncated:
                output += truncation_marker(self.max_chars)
            return output


def truncation_marker(max_chars: int) -> str:
    """Return the line appended to a stream that was cut after `max_chars` characters."""
    return f"\n[k3s-job-runner: output truncated after {max_chars} characters]\n"


def child_environment(workdir: str) -> dict[str, str]:
    """Build the child's whole environment: a fixed allowlist, nothing inherited.

    Python ignores `PYTHON*` variables under `-I`, so the interpreter's options are set on its
    command line instead.
    """
    return {
        "PATH": CHILD_PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def run_code(
    code: str, timeout_seconds: float, settings: RunnerSettings | None = None
) -> RunResult:
    """Run `code` in a child interpreter and collect its exit code and output.

    `timeout_seconds` may be fractional. Raises RunnerError when the interpreter cannot be
    started, and ValueError when `timeout_seconds` is not positive.
    """
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
    settings = settings or RunnerSettings.from_env()

    with tempfile.TemporaryDirectory(
        prefix="python-runner-", ignore_cleanup_errors=True
    ) as workdir:
        script = _write_script(workdir, code)
        return _run_script(script, workdir, timeout_seconds, settings)


def _write_script(workdir: str, code: str) -> str:
    path = os.path.join(workdir, SCRIPT_NAME)
    # surrogatepass keeps lone surrogates from the request as bytes, so the child reports them
    # as a SyntaxError instead of the runner failing before the code starts.
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as script:
        script.write(code)
    return path


def _run_script(
    script: str, workdir: str, timeout_seconds: float, settings: RunnerSettings
) -> RunResult:
    started = time.monotonic()
    process = _start_child(settings.interpreter, script, workdir)
    try:
        stdout = OutputCapture(settings.max_output_chars)
        stderr = OutputCapture(settings.max_output_chars)
        readers = [_start_reader(process.stdout, stdout), _start_reader(process.stderr, stderr)]
        with _kill_group_on_default_sigterm(process.pid):
            timed_out = _wait_or_stop(process.pid, timeout_seconds, settings.kill_grace_seconds)
        duration_ms = round((time.monotonic() - started) * 1000)
    finally:
        # Runs on every path, including Prefect's TerminationSignal raised from a SIGTERM
        # handler while waiting. The leader is not reaped yet, so its pid, which is also the
        # process group id, cannot have been reused.
        _signal_group(process.pid, signal.SIGKILL)
        exit_code = process.wait()

    _join_readers(readers, READER_JOIN_SECONDS)
    return RunResult(
        exit_code=exit_code,
        stdout=stdout.text(),
        stderr=stderr.text(),
        stdout_truncated=stdout.truncated,
        stderr_truncated=stderr.truncated,
        duration_ms=duration_ms,
        timed_out=timed_out,
    )


def _start_child(interpreter: str, script: str, workdir: str) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            [interpreter, "-I", "-B", script],
            cwd=workdir,
            env=child_environment(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
            preexec_fn=_parent_death_signal_hook(),
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise RunnerError(f"failed to start the interpreter {interpreter!r}: {error}") from error


def _parent_death_signal_hook() -> Callable[[], None] | None:
    """Build a pre-exec hook that makes the kernel SIGKILL the child when the runner dies.

    Returns None where prctl is unavailable (not Linux, or no libc to load). The kernel sends
    the signal when the thread that started the child exits, and that thread waits for the
    child, so this only fires when the runner dies.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    runner_pid = os.getpid()
    kill_signal = int(signal.SIGKILL)

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, kill_signal, 0, 0, 0)
        # The runner may have died between fork and prctl, before the setting took effect.
        if os.getppid() != runner_pid:
            os.kill(os.getpid(), kill_signal)

    return set_parent_death_signal


def _start_reader(stream: BinaryIO | None, capture: OutputCapture) -> threading.Thread:
    if stream is None:
        raise RunnerError("the child's output pipe is missing")
    reader = threading.Thread(
        target=_read_stream, args=(stream, capture), name="python-runner-reader", daemon=True
    )
    reader.start()
    return reader


def _read_stream(stream: BinaryIO, capture: OutputCapture) -> None:
    """Read `stream` until EOF, feeding every chunk to `capture` as it arrives."""
    with stream:
        while chunk := stream.read(READ_CHUNK_BYTES):
            capture.feed(chunk)
    capture.feed(b"", final=True)


def _join_readers(readers: list[threading.Thread], timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()))


def _wait_or_stop(pid: int, timeout_seconds: float, grace_seconds: float) -> bool:
    """Wait for the child to exit, stopping its process group at the timeout.

    Returns whether the timeout was reached. The child is left unreaped.
    """
    if _wait_without_reaping(pid, timeout_seconds):
        return False
    _signal_group(pid, signal.SIGTERM)
    if not _wait_without_reaping(pid, grace_seconds):
        _signal_group(pid, signal.SIGKILL)
    return True


def _wait_without_reaping(pid: int, timeout_seconds: float) -> bool:
    """Wait up to `timeout_seconds` for `pid` to exit, and return whether it did.

    WNOWAIT leaves the child a zombie, which keeps its pid and process group id reserved until
    `Popen.wait` reaps it, so signalling the group afterwards cannot reach an unrelated process.
    """
    deadline = time.monotonic() + timeout_seconds
    interval = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))
        interval = min(interval * 2, MAX_POLL_INTERVAL_SECONDS)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    # The group is gone once every member has exited.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


@contextlib.contextmanager
def _kill_group_on_default_sigterm(pgid: int) -> Iterator[None]:
    """Kill the child's process group before a SIGTERM ends this process.

    This matters when SIGTERM has its default action, which ends the process without running
    `finally` blocks. A Python handler that is already installed is left in place. Prefect
    3.9's flow engine installs one while a flow runs, which raises TerminationSignal, and the
    worker only acknowledges a cancel request while that handler is installed. The exception
    reaches the `finally` in `_run_script`, which kills the group. Signal handlers can only be
    set from the main thread, so elsewhere nothing is installed.

    NOTE: after a SIGKILL of this process only the parent-death signal acts, and it reaches the
    direct child alone, so processes the code started can outlive it.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def kill_group_then_terminate(signum: int, _frame: object) -> None:
        _signal_group(pgid, signal.SIGKILL)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, kill_group_then_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@flow(name="python-runner", persist_result=False, retries=0, log_prints=False)
def python_runner(code: str, timeout_seconds: int = 120) -> dict[str, Any]:
    """Run `code` in a child Python process and store the result as an artifact.

    Returns the same object as the artifact's `data`. Raises RunnerError, which fails the
    flow run, when the interpreter cannot be started.
    """
    logger = get_run_logger()
    settings = RunnerSettings.from_env()
    logger.info("running %d characters of code, timeout %s s", len(code), timeout_seconds)

    result = run_code(code, timeout_seconds, settings)
    payload = result.to_payload()
    logger.info(
        "code finished: exit code %d, %d ms, timed out %s, stdout truncated %s,"
        " stderr truncated %s",
        result.exit_code,
        result.duration_ms,
        result.timed_out,
        result.stdout_truncated,
        result.stderr_truncated,
    )

    # A markdown artifact stores its text unchanged in the artifact's `data` field, which is
    # where readers of the REST API parse the JSON from.
    create_markdown_artifact(
        markdown=json.dumps(payload),
        key=RESULT_ARTIFACT_KEY,
        description="Exit code and output of the submitted Python code (JSON).",
    )
    return payload
