"""Prefect flow `python-runner`: run submitted Python code in a sandboxed child process.

What the flow guarantees:

- The code runs once (no retries) in a separate interpreter, the base Python of the worker's
  virtualenv unless `PYTHON_RUNNER_INTERPRETER` names another, never in the flow's own
  process. The worker's virtualenv and its packages are not visible to the code.
- By default the child runs inside a bubblewrap sandbox (see `runner_sandbox`): no network,
  its own PID namespace and /proc, a read-only view of the system folders, and a private,
  size-limited /tmp that is its working directory, HOME and TMPDIR and contains the code as
  `/tmp/main.py`. When bubblewrap is missing or cannot create the sandbox, the runner raises
  RunnerError and the code does not run. Only `PYTHON_RUNNER_SANDBOX=none` runs the code
  without a sandbox, in a fresh temporary folder on the host, and the result then says
  `"sandbox": "none"`.
- Before the code starts, the child sets its resource limits (see `sandbox_entry`): address
  space (`PYTHON_RUNNER_MEMORY_MIB`), file size, CPU seconds, and in the sandbox the number
  of processes. The result's `limits` lists the values that were applied. A MemoryError that
  ends the code sets `memory_limit_exceeded`.
- The child gets an empty stdin, so `input()` raises EOFError at once, and an environment
  built from an allowlist. Nothing from the worker's environment (no `PREFECT_*`) is passed on.
- stdout and stderr are captured separately and decoded as UTF-8, with invalid bytes replaced
  by U+FFFD. Each stream keeps at most `PYTHON_RUNNER_MAX_OUTPUT_CHARS` characters and is then
  marked as truncated. Output is read as it arrives, also past the limit, so the child does not
  block on a full pipe.
- At `timeout_seconds` the code's main process gets SIGTERM, on which it flushes its stdout
  and stderr buffers and exits, and after a grace period everything the job started gets
  SIGKILL. In the sandbox, killing bubblewrap ends the sandbox's init, and with it every
  process in its PID namespace, also after a normal exit. Without the sandbox the child's
  process group is killed instead. NOTE: without the sandbox, a process that moves itself to
  another session or process group (setsid, daemonizing) escapes that.
- The result is stored as the flow run's artifact `python-runner-result`, whose `data` is a
  JSON object (see `RunResult.to_payload`), and is also the flow's return value.
- The flow run ends Completed whenever the code ran, whatever its exit code and also after a
  timeout. It fails only when the runner itself breaks, for example when the sandbox or the
  interpreter cannot be started.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from runner_process import (
    OutputCapture,
    StatusPipe,
    join_readers,
    kill_group_on_default_sigterm,
    signal_group,
    start_reader,
    wait_or_stop,
)
from runner_sandbox import (
    BUBBLEWRAP,
    NO_SANDBOX,
    SANDBOX_ENTRY,
    SANDBOX_MODES,
    SANDBOX_SCRIPT,
    SANDBOX_TMP,
    SETUP_ERROR,
    USERNS_HINT,
    BubblewrapFeatures,
    SandboxFiles,
    SandboxSpec,
    SandboxUnavailable,
    base_interpreter,
    become_child_subreaper,
    bubblewrap_arguments,
    chain_hooks,
    drop_root_hook,
    find_bubblewrap,
    interpreter_prefixes,
    parent_death_signal_hook,
    reap_orphaned_init,
    sandbox_ids,
    signal_sandboxed_code,
)
from sandbox_entry import STATUS_EXIT, STATUS_MEMORY_ERROR, STATUS_STARTED

RESULT_ARTIFACT_KEY = "python-runner-result"
RESULT_VERSION = 1

DEFAULT_MAX_OUTPUT_CHARS = 100_000
DEFAULT_KILL_GRACE_SECONDS = 2.0
DEFAULT_MEMORY_MIB = 256
# Processes and threads together, including the sandbox's init and the interpreter itself.
DEFAULT_MAX_PROCESSES = 64
DEFAULT_MAX_FILE_MIB = 64
DEFAULT_TMP_MIB = 64

# PATH for the child: system directories only, never the worker's virtualenv.
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
SCRIPT_NAME = "main.py"
ENTRY_SOURCE = Path(__file__).with_name("sandbox_entry.py")
# How long to wait for the reader threads after the child was killed. Without the sandbox, a
# process that left the group (for example with setsid) can keep a pipe open for longer.
READER_JOIN_SECONDS = 2.0
# How long to wait for the sandbox's init to exit after bubblewrap, before leaving it.
INIT_REAP_SECONDS = 5.0
# bubblewrap exits with 128 + N when the code's main process is killed by signal N.
SIGNAL_EXIT_BASE = 128
MAX_SIGNAL_NUMBER = 64


class RunnerError(RuntimeError):
    """The runner could not run the code, as opposed to the code failing."""


@dataclass(frozen=True)
class RunnerSettings:
    """Settings of the runner, read from the worker's environment."""

    interpreter: str = field(default_factory=base_interpreter)
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    kill_grace_seconds: float = DEFAULT_KILL_GRACE_SECONDS
    sandbox: str = BUBBLEWRAP
    memory_mib: int = DEFAULT_MEMORY_MIB
    max_processes: int = DEFAULT_MAX_PROCESSES
    max_file_mib: int = DEFAULT_MAX_FILE_MIB
    tmp_mib: int = DEFAULT_TMP_MIB
    # CPU seconds per process. None derives a backstop from the timeout (see `cpu_seconds_for`).
    cpu_seconds: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RunnerSettings:
        """Read `PYTHON_RUNNER_*` variables, using the defaults for those that are unset.

        Raises ValueError when a variable is set to an invalid value.
        """
        return cls(
            interpreter=environ.get("PYTHON_RUNNER_INTERPRETER") or base_interpreter(),
            max_output_chars=_read_positive_int(
                environ, "PYTHON_RUNNER_MAX_OUTPUT_CHARS", DEFAULT_MAX_OUTPUT_CHARS
            ),
            kill_grace_seconds=_read_non_negative_float(
                environ, "PYTHON_RUNNER_KILL_GRACE_SECONDS", DEFAULT_KILL_GRACE_SECONDS
            ),
            sandbox=_read_sandbox_mode(environ),
            memory_mib=_read_positive_int(environ, "PYTHON_RUNNER_MEMORY_MIB", DEFAULT_MEMORY_MIB),
            max_processes=_read_positive_int(
                environ, "PYTHON_RUNNER_MAX_PROCESSES", DEFAULT_MAX_PROCESSES
            ),
            max_file_mib=_read_positive_int(
                environ, "PYTHON_RUNNER_MAX_FILE_MIB", DEFAULT_MAX_FILE_MIB
            ),
            tmp_mib=_read_positive_int(environ, "PYTHON_RUNNER_TMP_MIB", DEFAULT_TMP_MIB),
            cpu_seconds=_read_optional_positive_int(environ, "PYTHON_RUNNER_CPU_SECONDS"),
        )

    def cpu_seconds_for(self, timeout_seconds: float) -> int:
        """Return the CPU-time limit of each process of a job with this timeout.

        Unless set, it is the timeout plus the grace period, times the number of CPUs: a
        backstop that even a process using every CPU reaches only after the runner's own kill.
        """
        if self.cpu_seconds is not None:
            return self.cpu_seconds
        wall_seconds = math.ceil(timeout_seconds + self.kill_grace_seconds)
        return wall_seconds * (os.cpu_count() or 1) + 1


def _read_sandbox_mode(environ: Mapping[str, str]) -> str:
    raw = environ.get("PYTHON_RUNNER_SANDBOX") or BUBBLEWRAP
    if raw not in SANDBOX_MODES:
        allowed = " or ".join(repr(mode) for mode in SANDBOX_MODES)
        raise ValueError(f"PYTHON_RUNNER_SANDBOX must be {allowed}, got {raw!r}")
    return raw


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


def _read_optional_positive_int(environ: Mapping[str, str], name: str) -> int | None:
    if not environ.get(name):
        return None
    return _read_positive_int(environ, name, default=0)


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
    memory_limit_exceeded: bool
    sandbox: str
    limits: dict[str, Any]

    def to_payload(self) -> dict[str, Any]:
        """Build the JSON object stored in the result artifact.

        `exit_code` is the code's exit status: a negative value -N means that signal N killed
        the code's main process, as `subprocess.Popen.returncode` reports it. `limits` contains
        the limits that were applied, where a null value marks a limit that was not enforced.
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
            "memory_limit_exceeded": self.memory_limit_exceeded,
            "sandbox": self.sandbox,
            "limits": dict(self.limits),
        }


def child_environment(home: str) -> dict[str, str]:
    """Build the child's whole environment: a fixed allowlist, nothing inherited.

    Python ignores `PYTHON*` variables under `-I`, so the interpreter's options are set on its
    command line instead. Caches of common tools go under `home`, the only writable folder.
    """
    return {
        "PATH": CHILD_PATH,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "XDG_CACHE_HOME": f"{home}/.cache",
        "PIP_CACHE_DIR": f"{home}/.cache/pip",
        "MPLCONFIGDIR": f"{home}/.config/matplotlib",
        # glibc reserves 64 MiB of address space per malloc arena, about one arena per thread,
        # so under the address-space limit a handful of threads would fail to allocate.
        "MALLOC_ARENA_MAX": "2",
    }


def applied_limits(
    settings: RunnerSettings, timeout_seconds: float, features: BubblewrapFeatures | None
) -> dict[str, Any]:
    """Return the limits a job gets, as reported in its result. None marks one not enforced.

    Without the sandbox, RLIMIT_NPROC would count every process of the worker's user on the
    machine (and does not apply to root at all), so the process limit is left out.
    """
    sandboxed = features is not None
    return {
        "memory_mib": settings.memory_mib,
        "max_processes": settings.max_processes if sandboxed else None,
        "max_file_mib": settings.max_file_mib,
        "tmp_mib": settings.tmp_mib if sandboxed and features.tmpfs_size else None,
        "cpu_seconds": settings.cpu_seconds_for(timeout_seconds),
        "max_output_chars": settings.max_output_chars,
        "timeout_seconds": timeout_seconds,
    }


def run_code(
    code: str, timeout_seconds: float, settings: RunnerSettings | None = None
) -> RunResult:
    """Run `code` in a child interpreter and collect its exit code and output.

    `timeout_seconds` may be fractional. Raises RunnerError when the sandbox or the
    interpreter cannot be started, and ValueError when `timeout_seconds` is not positive.
    """
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
    settings = settings or RunnerSettings.from_env()
    interpreter = os.path.realpath(settings.interpreter)
    if not os.access(interpreter, os.X_OK):
        raise RunnerError(f"the interpreter {settings.interpreter!r} is missing or not executable")
    features = _sandbox_features(settings)
    limits = applied_limits(settings, timeout_seconds, features)

    with tempfile.TemporaryDirectory(
        prefix="python-runner-", ignore_cleanup_errors=True
    ) as jobdir:
        job = _Job(code, interpreter, jobdir, timeout_seconds, settings, features, limits)
        return job.run()


def _sandbox_features(settings: RunnerSettings) -> BubblewrapFeatures | None:
    if settings.sandbox == NO_SANDBOX:
        return None
    try:
        return find_bubblewrap()
    except SandboxUnavailable as error:
        raise RunnerError(
            f"the job was rejected because the sandbox is unavailable: {error}"
        ) from error


class _StartFailed(Exception):
    """Popen failed, before the child could write any status but a pre-exec hook's."""


@dataclass
class _Launch:
    """How to start the child: its command, environment and inherited descriptors."""

    command: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: list[int]
    preexec_fn: Callable[[], None] | None
    files: SandboxFiles


@dataclass
class _Job:
    """One run of the code: starts the child, supervises it and builds the result."""

    code: str
    interpreter: str
    jobdir: str
    timeout_seconds: float
    settings: RunnerSettings
    features: BubblewrapFeatures | None
    limits: dict[str, Any]

    @property
    def sandboxed(self) -> bool:
        return self.features is not None

    def run(self) -> RunResult:
        with StatusPipe() as status, StatusPipe() as info:
            try:
                try:
                    process = self._start(status.write_fd, info.write_fd)
                finally:
                    # The child has its own copies. These would keep the pipes from EOF.
                    status.close_write_end()
                    info.close_write_end()
            except _StartFailed as failure:
                message = _with_setup_error(str(failure), status.read_lines())
                raise RunnerError(message) from failure
            return self._supervise(process, status, info)

    def _start(self, status_write: int, info_write: int) -> subprocess.Popen[bytes]:
        if self.sandboxed:
            launch = self._sandboxed_launch(status_write, info_write)
        else:
            launch = self._unsandboxed_launch(status_write)
        try:
            return _start_child(launch)
        finally:
            launch.files.close()

    def _entry_config(self, script: str, status_fd: int) -> str:
        entry_limits = {
            name: self.limits[name]
            for name in ("memory_mib", "max_file_mib", "max_processes", "cpu_seconds")
        }
        return json.dumps({"script": script, "status_fd": status_fd, "limits": entry_limits})

    def _unsandboxed_launch(self, status_write: int) -> _Launch:
        script = _write_script(self.jobdir, self.code)
        config = self._entry_config(script, status_write)
        return _Launch(
            command=[self.interpreter, "-I", "-B", str(ENTRY_SOURCE), config],
            env=child_environment(self.jobdir),
            cwd=self.jobdir,
            pass_fds=[status_write],
            preexec_fn=parent_death_signal_hook(),
            files=SandboxFiles(),
        )

    def _sandboxed_launch(self, status_write: int, info_write: int) -> _Launch:
        assert self.features is not None, "only called for a sandboxed job"
        uid, gid = sandbox_ids()
        prefixes = interpreter_prefixes(self.interpreter)
        drop_root = None
        if os.geteuid() == 0:
            staged = self._staging_folders(prefixes)
            drop_root = drop_root_hook(staged, status_write)
            prefix_mounts = [(staging, prefix) for prefix, staging in staged]
        else:
            prefix_mounts = [(prefix, prefix) for prefix in prefixes]

        spec = SandboxSpec(
            features=self.features,
            prefix_mounts=prefix_mounts,
            environment=child_environment(SANDBOX_TMP),
            tmp_mib=self.settings.tmp_mib,
            uid=uid,
            gid=gid,
        )
        files = SandboxFiles()
        options = bubblewrap_arguments(
            spec, files, _encode_code(self.code), ENTRY_SOURCE.read_bytes()
        )
        config = self._entry_config(SANDBOX_SCRIPT, status_write)
        # bubblewrap writes the host pid of the sandbox's init to the info descriptor.
        options += ["--info-fd", str(info_write)]
        command = [self.features.path, *options, "--", self.interpreter, "-I", "-B"]
        become_child_subreaper()
        return _Launch(
            command=[*command, SANDBOX_ENTRY, config],
            # bubblewrap's own environment stays readable as /proc/1/environ in the sandbox.
            env={},
            cwd="/",
            pass_fds=[*files.fds, status_write, info_write],
            preexec_fn=chain_hooks(drop_root, parent_death_signal_hook()),
            files=files,
        )

    def _staging_folders(self, prefixes: list[str]) -> list[tuple[str, str]]:
        """Create an empty folder per prefix that uid 65534 can enter, for `drop_root_hook`."""
        os.chmod(self.jobdir, 0o711)
        staged = []
        for index, prefix in enumerate(prefixes):
            staging = os.path.join(self.jobdir, f"prefix-{index}")
            os.mkdir(staging, 0o755)
            staged.append((prefix, staging))
        return staged

    def _supervise(
        self, process: subprocess.Popen[bytes], status: StatusPipe, info: StatusPipe
    ) -> RunResult:
        started = time.monotonic()
        try:
            stdout = OutputCapture(self.settings.max_output_chars)
            stderr = OutputCapture(self.settings.max_output_chars)
            readers = [
                start_reader(process.stdout, stdout),
                start_reader(process.stderr, stderr),
            ]
            with kill_group_on_default_sigterm(process.pid):
                timed_out = wait_or_stop(
                    process.pid,
                    self.timeout_seconds,
                    self.settings.kill_grace_seconds,
                    self._terminate,
                )
            duration_ms = round((time.monotonic() - started) * 1000)
        finally:
            # Runs on every path, including Prefect's TerminationSignal raised from a SIGTERM
            # handler while waiting. The leader is not reaped yet, so its pid, which is also
            # the process group id, cannot have been reused. In the sandbox, bubblewrap's
            # death kills the sandbox's init, which ends its whole PID namespace.
            signal_group(process.pid, signal.SIGKILL)
            returncode = process.wait()
            if self.sandboxed:
                reap_orphaned_init(info.read_text(), INIT_REAP_SECONDS)

        join_readers(readers, READER_JOIN_SECONDS)
        status_lines = status.read_lines()
        if STATUS_STARTED not in status_lines:
            raise RunnerError(self._start_failure(stderr.text(), status_lines))
        return RunResult(
            exit_code=self._exit_code(returncode, status_lines),
            stdout=stdout.text(),
            stderr=stderr.text(),
            stdout_truncated=stdout.truncated,
            stderr_truncated=stderr.truncated,
            duration_ms=duration_ms,
            timed_out=timed_out,
            memory_limit_exceeded=STATUS_MEMORY_ERROR in status_lines,
            sandbox=BUBBLEWRAP if self.sandboxed else NO_SANDBOX,
            limits=self.limits,
        )

    def _terminate(self, pid: int) -> None:
        if self.sandboxed:
            signal_sandboxed_code(pid, signal.SIGTERM)
        else:
            signal_group(pid, signal.SIGTERM)

    def _exit_code(self, returncode: int, status: list[str]) -> int:
        """Translate bubblewrap's 128 + N for a death by signal N into -N.

        The entry records a voluntary exit with SystemExit, so `sys.exit(137)` stays 137.
        NOTE: `os._exit(N)` with N from 129 to 192 is still reported as signal N - 128.
        """
        if not self.sandboxed or f"{STATUS_EXIT} {returncode}" in status:
            return returncode
        if SIGNAL_EXIT_BASE < returncode <= SIGNAL_EXIT_BASE + MAX_SIGNAL_NUMBER:
            return SIGNAL_EXIT_BASE - returncode
        return returncode

    def _start_failure(self, stderr: str, status: list[str]) -> str:
        output = stderr.strip() or "no output"
        if self.sandboxed:
            message = f"the sandbox failed to start the code: {output}. {USERNS_HINT}"
        else:
            message = f"the interpreter {self.interpreter!r} failed to start the code: {output}"
        return _with_setup_error(message, status)

def _with_setup_error(message: str, status: list[str]) -> str:
    errors = [line for line in status if line.startswith(SETUP_ERROR)]
    if not errors:
        return message
    return f"{message} ({errors[0]})"


def _encode_code(code: str) -> bytes:
    # surrogatepass keeps lone surrogates from the request as bytes, so the child reports them
    # as a SyntaxError instead of the runner failing before the code starts.
    return code.encode("utf-8", errors="surrogatepass")


def _write_script(workdir: str, code: str) -> str:
    path = os.path.join(workdir, SCRIPT_NAME)
    with open(path, "wb") as script:
        script.write(_encode_code(code))
    return path


def _start_child(launch: _Launch) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            launch.command,
            cwd=launch.cwd,
            env=launch.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
            pass_fds=launch.pass_fds,
            preexec_fn=launch.preexec_fn,
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise _StartFailed(f"failed to start {launch.command[0]!r}: {error}") from error


@flow(name="python-runner", persist_result=False, retries=0, log_prints=False)
def python_runner(code: str, timeout_seconds: int = 120) -> dict[str, Any]:
    """Run `code` in a sandboxed child Python process and store the result as an artifact.

    Returns the same object as the artifact's `data`. Raises RunnerError, which fails the
    flow run with the error as its state message, when the sandbox or the interpreter cannot
    be started.
    """
    logger = get_run_logger()
    settings = RunnerSettings.from_env()
    logger.info(
        "running %d characters of code, timeout %s s, sandbox %s",
        len(code),
        timeout_seconds,
        settings.sandbox,
    )

    result = run_code(code, timeout_seconds, settings)
    payload = result.to_payload()
    logger.info(
        "code finished: exit code %d, %d ms, timed out %s, memory limit exceeded %s,"
        " stdout truncated %s, stderr truncated %s",
        result.exit_code,
        result.duration_ms,
        result.timed_out,
        result.memory_limit_exceeded,
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
