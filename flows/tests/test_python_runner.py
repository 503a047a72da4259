"""Tests of `run_code`, the part of the python-runner flow that runs code in a child process.

They start real bubblewrap sandboxes and child interpreters but no Prefect server, so
bubblewrap must be installed (`deploy/local/stack.sh up` installs it). After each job, the
`job` fixture checks that no process of the job is left: bubblewrap is reaped, and no process
remains in the sandbox's PID namespace or, without the sandbox, in the job's folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

import python_runner
import runner_sandbox
from python_runner import RunnerError, RunnerSettings, RunResult, run_code
from runner_process import OutputCapture, truncation_marker
from runner_sandbox import BubblewrapFeatures, base_interpreter, child_pids

FAST = RunnerSettings(kill_grace_seconds=0.5)
UNSANDBOXED = replace(FAST, sandbox="none")
FLOWS_DIR = Path(__file__).resolve().parents[1]


def process_is_running(pid: int) -> bool:
    """Return whether `pid` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state letter follows the command name, which is in parentheses.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z"


def wait_until(condition, timeout_seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def processes_in_namespace(namespace: str) -> list[int]:
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and pid_namespace(int(entry)) == namespace
    ]


def processes_in_folder(folder: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if entry.isdigit() and cwd.startswith(folder):
            found.append(int(entry))
    return found


def is_unreaped_child(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


class JobWatch:
    """Processes of the jobs started while a test runs, recorded from outside the sandbox."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.folders: list[str] = []
        self.namespaces: set[str] = set()
        self.code_started = threading.Event()
        self._own_namespace = pid_namespace(os.getpid())

    def started(self, pid: int, cwd: str) -> None:
        self.pids.append(pid)
        if cwd != "/":
            self.folders.append(cwd)
        threading.Thread(target=self._watch, args=(pid,), daemon=True).start()

    def _watch(self, bwrap_pid: int) -> None:
        # The sandbox's init is bubblewrap's child and the code's interpreter its grandchild.
        while process_is_running(bwrap_pid):
            for init_pid in child_pids(bwrap_pid):
                namespace = pid_namespace(init_pid)
                if namespace is not None and namespace != self._own_namespace:
                    self.namespaces.add(namespace)
                if child_pids(init_pid):
                    self.code_started.set()
            time.sleep(0.001)

    def leftover_processes(self) -> list[int]:
        left = [pid for pid in self.pids if process_is_running(pid) or is_unreaped_child(pid)]
        for namespace in self.namespaces:
            left += processes_in_namespace(namespace)
        for folder in self.folders:
            left += processes_in_folder(folder)
        return left


@pytest.fixture
def job(monkeypatch):
    """Record every child the runner starts, and check afterwards that none is left."""
    watch = JobWatch()
    start_child = python_runner._start_child

    def recording_start_child(launch):
        process = start_child(launch)
        watch.started(process.pid, launch.cwd)
        return process

    monkeypatch.setattr(python_runner, "_start_child", recording_start_child)
    yield watch
    assert wait_until(lambda: not watch.leftover_processes()), watch.leftover_processes()


def run(code: str, timeout_seconds: float = 10.0, settings: RunnerSettings = FAST) -> RunResult:
    return run_code(code, timeout_seconds, settings)


# Cases of misbehaving code, in the sandbox.


def test_print_returns_stdout(job):
    result = run("print('hi')")

    assert result.stdout == "hi\n"
    assert result.stderr == ""
    assert result.exit_code == 0
    assert result.timed_out is False
    assert result.memory_limit_exceeded is False
    assert result.sandbox == "bubblewrap"
    assert result.stdout_truncated is False
    assert result.stderr_truncated is False
    assert job.namespaces


def test_memory_limit_reported(job):
    result = run('print("before", flush=True); b = bytearray(600 * 1024 * 1024)')

    assert result.stdout == "before\n"
    assert result.memory_limit_exceeded is True
    assert result.exit_code == 1
    assert result.timed_out is False
    assert "MemoryError" in result.stderr
    assert result.limits["memory_mib"] == 256
    assert len(job.pids) == 1


def test_memory_limit_traceback_shows_only_user_code(job):
    result = run("data = []\nwhile True: data.append(bytearray(1024 * 1024))")

    assert result.memory_limit_exceeded is True
    assert 'File "/tmp/main.py", line 2' in result.stderr
    assert "sandbox_entry" not in result.stderr


def test_memory_limit_is_a_setting(job):
    code = "b = bytearray(100 * 1024 * 1024); print('ok')"
    result = run(code, settings=replace(FAST, memory_mib=64))

    assert result.memory_limit_exceeded is True
    assert result.limits["memory_mib"] == 64
    assert result.stdout == ""


def test_threads_work_under_memory_limit(job):
    code = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def work(i): return len([bytearray(1000) for _ in range(2000)])\n"
        "with ThreadPoolExecutor(16) as pool: print(sum(pool.map(work, range(64))))\n"
    )
    result = run(code)

    assert result.stdout == "128000\n"
    assert result.memory_limit_exceeded is False


def test_large_print_cut_at_default_limit(job):
    result = run('print("A" * 2_000_000)')

    assert result.exit_code == 0
    assert result.stdout_truncated is True
    assert result.stderr_truncated is False
    assert result.stdout == "A" * 100_000 + truncation_marker(100_000)
    assert result.limits["max_output_chars"] == 100_000


def test_many_small_prints_cut_at_default_limit(job):
    result = run("for i in range(300000): print(i)")

    expected = "".join(f"{i}\n" for i in range(300000))[:100_000]
    assert result.exit_code == 0
    assert result.stdout_truncated is True
    assert result.stdout == expected + truncation_marker(100_000)


def test_invalid_utf8_becomes_replacement(job):
    code = (
        "import sys\n"
        'sys.stdout.buffer.write(b"ok \\xff\\xb2 end\\n")\n'
        'print("h\\u00e9llo \\u2713 \\u65e5\\u672c")\n'
        'sys.stderr.buffer.write(b"\\x80\\n")\n'
    )
    result = run(code)

    assert result.exit_code == 0
    assert result.stdout == "ok \ufffd\ufffd end\nh\u00e9llo \u2713 \u65e5\u672c\n"
    assert result.stderr == "\ufffd\n"


def test_timeout_keeps_unflushed_output(job):
    # No flush=True: the output sits in the child's stdout buffer until SIGTERM flushes it.
    started = time.monotonic()
    result = run('print("before")\nwhile True: pass', timeout_seconds=2.0)
    elapsed = time.monotonic() - started

    assert result.timed_out is True
    assert result.stdout == "before\n"
    assert result.exit_code == -signal.SIGTERM
    assert elapsed < 2.0 + 5.0


def test_background_process_killed_after_exit(job):
    started = time.monotonic()
    result = run('import subprocess; subprocess.Popen(["sleep", "1000"]); print("bye")')
    elapsed = time.monotonic() - started

    assert result.stdout == "bye\n"
    assert result.exit_code == 0
    assert result.timed_out is False
    assert elapsed < 2.0


def test_detached_process_killed_after_exit(job):
    # A new session escapes a process-group kill, but not the end of the PID namespace.
    code = 'import subprocess; subprocess.Popen(["sleep", "30"], start_new_session=True)'
    started = time.monotonic()
    result = run(code)

    assert result.exit_code == 0
    assert time.monotonic() - started < 2.0


def test_timeout_kills_whole_process_tree(job):
    code = (
        "import subprocess, time\n"
        'subprocess.Popen(["sh", "-c", "while :; do echo t; sleep 1; done"])\n'
        "time.sleep(999)\n"
    )
    started = time.monotonic()
    result = run(code, timeout_seconds=2.5)
    elapsed = time.monotonic() - started

    assert result.timed_out is True
    assert result.stdout.startswith("t\n")
    assert elapsed < 2.5 + FAST.kill_grace_seconds + 1.0


def test_input_gets_eof_at_once(job):
    started = time.monotonic()
    result = run('print("hi", input("name? "))')

    assert time.monotonic() - started < 2.0
    assert "EOFError" in result.stderr
    assert result.exit_code == 1
    assert result.timed_out is False


def test_endless_output_capped_until_timeout(job):
    result = run('while True: print("x" * 10000)', timeout_seconds=3.0)

    assert result.timed_out is True
    assert result.stdout_truncated is True
    assert len(result.stdout) == 100_000 + len(truncation_marker(100_000))


def test_environment_is_allowlist_only(job, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.setenv("PREFECT_API_KEY", "secret")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///x.db")
    result = run("import os; print(sorted(os.environ))")

    assert result.stdout == (
        "['HOME', 'LANG', 'LC_ALL', 'MALLOC_ARENA_MAX', 'MPLCONFIGDIR', 'PATH',"
        " 'PIP_CACHE_DIR', 'PWD', 'TMPDIR', 'XDG_CACHE_HOME']\n"
    )


def test_sandbox_init_environment_is_empty(job, monkeypatch):
    monkeypatch.setenv("PREFECT_API_KEY", "secret")
    result = run("print(repr(open('/proc/1/environ', 'rb').read()))")

    assert result.stdout == "b''\n"


def test_proc_shows_only_sandbox_processes(job):
    result = run("import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")

    assert result.stdout == "[1, 2]\n"


def test_loopback_listener_unreachable(job):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code = (
            "import urllib.request as u\n"
            f'u.urlopen("http://127.0.0.1:{port}/api/health", timeout=3)\n'
        )
        started = time.monotonic()
        result = run(code)
        elapsed = time.monotonic() - started
        listener.settimeout(0.1)
        with pytest.raises(TimeoutError):
            listener.accept()

    assert result.exit_code == 1
    assert "URLError" in result.stderr
    assert elapsed < 3.5


def test_only_loopback_interface(job):
    result = run("import socket; print([name for _, name in socket.if_nameindex()])")

    assert result.stdout == "['lo']\n"


def test_etc_is_read_only(job):
    result = run('open("/etc/x", "w")')

    assert result.exit_code == 1
    assert "Read-only file system: '/etc/x'" in result.stderr


def test_tempfile_is_writable(job):
    code = (
        "import tempfile\n"
        "p = tempfile.mkstemp()[1]\n"
        'open(p, "w").write("ok")\n'
        "print(open(p).read())\n"
    )
    result = run(code)

    assert result.stdout == "ok\n"
    assert result.exit_code == 0


def test_system_folders_are_read_only(job):
    code = (
        "import os, sys\n"
        "for folder in ['/', '/usr', '/dev', '/run', sys.prefix]:\n"
        "    try:\n"
        "        open(os.path.join(folder, 'x'), 'w')\n"
        "        print(folder, 'writable')\n"
        "    except OSError as error:\n"
        "        print(folder, error.errno)\n"
    )
    result = run(code)

    lines = result.stdout.splitlines()
    assert len(lines) == 5
    assert all(line.endswith(" 30") for line in lines), lines


def test_worker_files_not_visible(job):
    hidden = [str(FLOWS_DIR), sys.prefix, os.environ.get("PREFECT_HOME", "/root/.prefect")]
    code = f"import os; print([os.path.exists(p) for p in {hidden!r}])"
    result = run(code)

    assert result.stdout == "[False, False, False]\n"


def test_workdir_is_private_tmp(job):
    code = (
        "import os\n"
        "print(os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'])\n"
        "print(sorted(os.listdir('/tmp')))\n"
    )
    result = run(code)

    assert result.stdout == "/tmp /tmp /tmp\n['main.py']\n"


def test_os_exit_code_reported(job):
    result = run('import os; print("side-effect", flush=True); os._exit(3)')

    assert result.exit_code == 3
    assert result.stdout == "side-effect\n"
    assert len(job.pids) == 1


def test_both_streams_and_system_exit(job):
    result = run('import sys; print("out"); print("err", file=sys.stderr); raise SystemExit(1)')

    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 1


def test_exit_code_above_128_kept(job):
    result = run("import sys; sys.exit(137)")

    assert result.exit_code == 137


def test_death_by_signal_reported_negative(job):
    result = run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")

    assert result.exit_code == -signal.SIGKILL


def test_traceback_shows_only_user_code(job):
    result = run("def f():\n    1 / 0\nf()")

    assert result.stderr.startswith('Traceback (most recent call last):\n  File "/tmp/main.py"')
    assert "ZeroDivisionError" in result.stderr
    assert "sandbox_entry" not in result.stderr


def test_syntax_error_reported(job):
    result = run("x = (")

    assert result.exit_code == 1
    assert "SyntaxError" in result.stderr


# Limits other than memory.


def test_process_limit_stops_forks(job):
    code = (
        "import subprocess\n"
        "children = []\n"
        "try:\n"
        "    for _ in range(100):\n"
        '        children.append(subprocess.Popen(["sleep", "30"]))\n'
        "except OSError as error:\n"
        "    print(error.errno)\n"
        "print(len(children))\n"
    )
    result = run(code, settings=replace(FAST, max_processes=10))

    # The sandbox's init and the interpreter count too.
    assert result.stdout == "11\n8\n"
    assert result.limits["max_processes"] == 10


def test_process_limit_counts_each_job_alone(job):
    code = (
        "import subprocess, time\n"
        "children = []\n"
        "try:\n"
        "    for _ in range(100):\n"
        '        children.append(subprocess.Popen(["sleep", "30"]))\n'
        "except OSError:\n"
        "    pass\n"
        "time.sleep(1)\n"
        "print(len(children))\n"
    )
    settings = replace(FAST, max_processes=10)
    results: list[RunResult] = []
    jobs = [threading.Thread(target=lambda: results.append(run(code, settings=settings)))]
    jobs.append(threading.Thread(target=lambda: results.append(run(code, settings=settings))))
    for thread in jobs:
        thread.start()
    for thread in jobs:
        thread.join()

    assert [result.stdout for result in results] == ["8\n", "8\n"]


def test_file_size_limit(job):
    code = "open('/tmp/big', 'wb').write(b'x' * (2 * 1024 * 1024))"
    result = run(code, settings=replace(FAST, max_file_mib=1))

    assert result.exit_code == 1
    assert "File too large" in result.stderr


def test_tmp_size_limit(job):
    code = (
        "for i in range(10):\n"
        "    open(f'/tmp/part{i}', 'wb').write(b'x' * (1024 * 1024))\n"
    )
    result = run(code, settings=replace(FAST, tmp_mib=4, max_file_mib=2))

    assert result.exit_code == 1
    assert "No space left on device" in result.stderr
    assert result.limits["tmp_mib"] == 4


def test_cpu_limit_reported(job):
    result = run("print('hi')", timeout_seconds=10)

    assert result.limits["cpu_seconds"] > 10
    assert result.limits["timeout_seconds"] == 10


def test_cpu_limit_stops_busy_loop(job):
    # Ending before the wall-clock timeout shows that the CPU limit stopped the loop.
    code = 'print("before")\nwhile True: pass'
    result = run(code, timeout_seconds=30, settings=replace(FAST, cpu_seconds=1))

    assert result.timed_out is False
    assert result.exit_code == -signal.SIGXCPU
    assert result.stdout == "before\n"


# Timeouts and cancellation.


def test_timeout_kills_sigterm_ignoring_code(job):
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(999)\n"
    )
    started = time.monotonic()
    result = run(code, timeout_seconds=0.5)
    elapsed = time.monotonic() - started

    assert result.timed_out is True
    assert result.exit_code == -signal.SIGKILL
    assert elapsed < 0.5 + FAST.kill_grace_seconds + 1.0


class Terminated(Exception):
    pass


def test_sigterm_exception_kills_sandbox(job):
    # Prefect's flow engine handles SIGTERM by raising an exception in the main thread.
    code = 'import subprocess, time; subprocess.Popen(["sleep", "999"]); time.sleep(999)'

    def raise_terminated(_signum, _frame):
        raise Terminated()

    def send_sigterm_when_started():
        assert job.code_started.wait(10)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    started = time.monotonic()
    try:
        threading.Thread(target=send_sigterm_when_started, daemon=True).start()
        with pytest.raises(Terminated):
            run(code, timeout_seconds=30)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert time.monotonic() - started < 10
    assert job.namespaces


RUN_CODE_SCRIPT = (
    "import sys; sys.path.insert(0, sys.argv[1])\n"
    "from python_runner import run_code\n"
    "run_code(sys.argv[2], 30)\n"
)


def start_runner_process(code: str) -> tuple[subprocess.Popen, int]:
    """Start `run_code(code)` in a separate Python; return it and its sandbox's init pid."""
    runner = subprocess.Popen([sys.executable, "-c", RUN_CODE_SCRIPT, str(FLOWS_DIR), code])

    def init_running_code() -> int | None:
        for bwrap_pid in child_pids(runner.pid):
            for init_pid in child_pids(bwrap_pid):
                if child_pids(init_pid):
                    return init_pid
        return None

    # Importing Prefect in the new interpreter alone takes seconds on a loaded machine.
    assert wait_until(lambda: init_running_code() is not None, timeout_seconds=60)
    return runner, init_running_code()


def reap_if_orphaned_here(pid: int) -> None:
    # This process is a child subreaper once it has run a sandbox, so a sandbox init orphaned
    # by a runner that died is reparented here, possibly only after this call: see
    # `sandbox_gone`, which reaps again while it waits.
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)


def sandbox_gone(init_pid: int, namespace: str | None) -> bool:
    """Reap the sandbox init if it was orphaned here, then report whether the sandbox is empty."""
    reap_if_orphaned_here(init_pid)
    return not processes_in_namespace(namespace)


def test_default_sigterm_kills_sandbox():
    code = 'import subprocess, time; subprocess.Popen(["sleep", "999"]); time.sleep(999)'
    runner, init_pid = start_runner_process(code)
    namespace = pid_namespace(init_pid)
    runner.send_signal(signal.SIGTERM)

    assert runner.wait(timeout=10) == -signal.SIGTERM
    assert wait_until(lambda: sandbox_gone(init_pid, namespace), timeout_seconds=10)


def test_runner_death_kills_sandbox():
    runner, init_pid = start_runner_process("import time; time.sleep(999)")
    namespace = pid_namespace(init_pid)
    runner.kill()
    runner.wait(timeout=10)

    assert wait_until(lambda: sandbox_gone(init_pid, namespace), timeout_seconds=10)


# When the sandbox cannot be used.


def test_missing_bubblewrap_rejects_job(job, monkeypatch):
    monkeypatch.setattr(runner_sandbox.shutil, "which", lambda *_args, **_kwargs: None)

    with pytest.raises(RunnerError, match="apt-get install bubblewrap") as raised:
        run("print('hi')")

    assert "PYTHON_RUNNER_SANDBOX=none" in str(raised.value)
    assert job.pids == []


def test_failing_bubblewrap_rejects_job(job, monkeypatch):
    # The fake must be runnable by uid 65534 when the tests run as root, and pytest's own
    # temporary folders are private to root.
    folder = tempfile.TemporaryDirectory(prefix="fake-bwrap-")
    os.chmod(folder.name, 0o755)
    fake = Path(folder.name) / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    features = BubblewrapFeatures(path=str(fake), tmpfs_size=True, disable_userns=True)
    monkeypatch.setattr(python_runner, "find_bubblewrap", lambda: features)

    with folder, pytest.raises(RunnerError, match="No permissions") as raised:
        run("print('hi')")

    assert "bwrap: No permissions to create new namespace" in str(raised.value)
    assert "unprivileged user namespaces" in str(raised.value)


def test_missing_interpreter_raises_runner_error(job):
    settings = replace(FAST, interpreter="/nonexistent/python3")

    with pytest.raises(RunnerError, match="/nonexistent/python3"):
        run("print('hi')", settings=settings)


# Without the sandbox.


def test_unsandboxed_run_says_so(job):
    result = run("print('hi')", settings=UNSANDBOXED)

    assert result.stdout == "hi\n"
    assert result.sandbox == "none"
    assert result.limits["max_processes"] is None
    assert result.limits["tmp_mib"] is None


def test_unsandboxed_memory_limit_reported(job):
    code = 'print("before", flush=True); b = bytearray(600 * 1024 * 1024)'
    result = run(code, settings=UNSANDBOXED)

    assert result.stdout == "before\n"
    assert result.memory_limit_exceeded is True
    assert result.exit_code == 1


def test_unsandboxed_timeout_keeps_output(job):
    result = run('print("before")\nwhile True: pass', 1.0, settings=UNSANDBOXED)

    assert result.timed_out is True
    assert result.exit_code == -signal.SIGTERM
    assert result.stdout == "before\n"


def test_unsandboxed_workdir_is_home_and_tmpdir(job):
    code = (
        "import os, tempfile\n"
        "print(os.getcwd())\n"
        "print(os.environ['HOME'])\n"
        "print(os.environ['TMPDIR'])\n"
        "path = tempfile.mkstemp()[1]\n"
        "open(path, 'w').write('ok')\n"
        "print(open(path).read())\n"
    )
    result = run(code, settings=UNSANDBOXED)
    workdir, home, tmpdir, written = result.stdout.splitlines()

    assert home == workdir
    assert tmpdir == workdir
    assert written == "ok"
    assert not os.path.exists(workdir)


def test_unsandboxed_timeout_kills_process_tree(job):
    code = (
        "import subprocess, time\n"
        'shell = subprocess.Popen(["sh", "-c", "sleep 999 & echo $!; wait"],'
        " stdout=subprocess.PIPE, text=True)\n"
        "print(shell.pid, shell.stdout.readline().strip(), flush=True)\n"
        "time.sleep(999)\n"
    )
    result = run(code, timeout_seconds=1.5, settings=UNSANDBOXED)
    shell_pid, sleep_pid = (int(pid) for pid in result.stdout.split())

    assert result.timed_out is True
    assert wait_until(lambda: not process_is_running(shell_pid))
    assert wait_until(lambda: not process_is_running(sleep_pid))


def test_unsandboxed_detached_grandchild_does_not_hang():
    # Without the sandbox the grandchild leaves the process group, so killing the group misses
    # it, and it keeps stdout open. The runner must still return after its bounded wait.
    code = (
        "import subprocess\n"
        'child = subprocess.Popen(["sleep", "30"], start_new_session=True)\n'
        "print(child.pid, flush=True)\n"
    )
    started = time.monotonic()
    result = run(code, settings=UNSANDBOXED)
    elapsed = time.monotonic() - started
    os.kill(int(result.stdout.split()[0]), signal.SIGKILL)

    assert result.exit_code == 0
    assert elapsed < 5.0


def write_pid_and_sleep_code(pid_file: Path) -> str:
    """Return code that starts a `sleep`, writes its pid to `pid_file`, then waits."""
    return (
        "import subprocess, time\n"
        'child = subprocess.Popen(["sleep", "999"])\n'
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(999)\n"
    )


def read_pid_when_written(pid_file: Path, timeout_seconds: float = 5.0) -> int:
    written = wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout_seconds)
    assert written, f"{pid_file} was not written within {timeout_seconds} s"
    return int(pid_file.read_text())


def test_unsandboxed_sigterm_exception_kills_process_tree(job, tmp_path):
    pid_file = tmp_path / "sleep.pid"

    def raise_terminated(_signum, _frame):
        raise Terminated()

    def send_sigterm_when_started():
        read_pid_when_written(pid_file)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        threading.Thread(target=send_sigterm_when_started, daemon=True).start()
        with pytest.raises(Terminated):
            run(write_pid_and_sleep_code(pid_file), timeout_seconds=30, settings=UNSANDBOXED)
    finally:
        signal.signal(signal.SIGTERM, previous)

    sleep_pid = read_pid_when_written(pid_file)
    assert wait_until(lambda: not process_is_running(sleep_pid))


# Output capture.


def test_output_at_limit_not_truncated(job):
    result = run('print("123456789")', settings=replace(FAST, max_output_chars=10))

    assert result.stdout == "123456789\n"
    assert result.stdout_truncated is False


def test_truncation_keeps_characters_whole(job):
    # 7 ASCII characters then 3-byte and 4-byte characters, so the byte and character
    # positions of the limit differ.
    code = 'import sys; sys.stdout.write("abcdefg" + "\\u65e5\\U0001F600" * 50)'
    result = run(code, settings=replace(FAST, max_output_chars=10))

    assert result.stdout_truncated is True
    assert result.stdout == "abcdefg\u65e5\U0001F600\u65e5" + truncation_marker(10)
    assert "\ufffd" not in result.stdout


def test_incomplete_final_character_replaced(job):
    result = run('import sys; sys.stdout.buffer.write(b"end \\xe6\\x97")')

    assert result.stdout == "end \ufffd"


def test_capture_joins_split_characters():
    capture = OutputCapture(max_chars=100)
    data = "h\u00e9llo \u2713 \U0001F600".encode()
    for byte in data:
        capture.feed(bytes([byte]))
    capture.feed(b"", final=True)

    assert capture.text() == "h\u00e9llo \u2713 \U0001F600"
    assert capture.truncated is False


def test_capture_drops_data_after_limit():
    capture = OutputCapture(max_chars=4)
    capture.feed(b"abc")
    capture.feed(b"def")
    capture.feed(b"ghi")

    assert capture.text() == "abcd" + truncation_marker(4)
    assert capture.truncated is True


# Settings and result.


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_seconds"):
        run("print('hi')", timeout_seconds=0)


def test_settings_read_from_environment():
    settings = RunnerSettings.from_env(
        {
            "PYTHON_RUNNER_INTERPRETER": "/usr/bin/python3",
            "PYTHON_RUNNER_MAX_OUTPUT_CHARS": "50",
            "PYTHON_RUNNER_KILL_GRACE_SECONDS": "0.25",
            "PYTHON_RUNNER_SANDBOX": "none",
            "PYTHON_RUNNER_MEMORY_MIB": "128",
            "PYTHON_RUNNER_MAX_PROCESSES": "32",
            "PYTHON_RUNNER_MAX_FILE_MIB": "8",
            "PYTHON_RUNNER_TMP_MIB": "16",
            "PYTHON_RUNNER_CPU_SECONDS": "30",
        }
    )

    assert settings == RunnerSettings(
        interpreter="/usr/bin/python3",
        max_output_chars=50,
        kill_grace_seconds=0.25,
        sandbox="none",
        memory_mib=128,
        max_processes=32,
        max_file_mib=8,
        tmp_mib=16,
        cpu_seconds=30,
    )


def test_settings_defaults_when_unset():
    settings = RunnerSettings.from_env({})

    assert settings.interpreter == base_interpreter()
    assert settings.max_output_chars == 100_000
    assert settings.kill_grace_seconds == 2.0
    assert settings.sandbox == "bubblewrap"
    assert settings.memory_mib == 256
    assert settings.max_processes == 64
    assert settings.max_file_mib == 64
    assert settings.tmp_mib == 64
    assert settings.cpu_seconds is None


def test_default_interpreter_is_base_python():
    assert base_interpreter() == os.path.realpath(sys._base_executable)
    assert not base_interpreter().startswith(sys.prefix + "/") or sys.prefix == sys.base_prefix


@pytest.mark.parametrize(
    "name, value",
    [
        ("PYTHON_RUNNER_MAX_OUTPUT_CHARS", "0"),
        ("PYTHON_RUNNER_MAX_OUTPUT_CHARS", "many"),
        ("PYTHON_RUNNER_KILL_GRACE_SECONDS", "-1"),
        ("PYTHON_RUNNER_KILL_GRACE_SECONDS", "nan"),
        ("PYTHON_RUNNER_SANDBOX", "docker"),
        ("PYTHON_RUNNER_MEMORY_MIB", "-5"),
        ("PYTHON_RUNNER_MAX_PROCESSES", "0"),
        ("PYTHON_RUNNER_CPU_SECONDS", "1.5"),
    ],
)
def test_settings_reject_invalid_values(name, value):
    with pytest.raises(ValueError, match=name):
        RunnerSettings.from_env({name: value})


def test_payload_has_all_fields(job):
    payload = run("print('hi')").to_payload()

    assert set(payload) == {
        "version",
        "exit_code",
        "stdout",
        "stderr",
        "stdout_truncated",
        "stderr_truncated",
        "duration_ms",
        "timed_out",
        "memory_limit_exceeded",
        "sandbox",
        "limits",
    }
    assert payload["version"] == 1
    assert isinstance(payload["duration_ms"], int)
    assert payload["sandbox"] == "bubblewrap"
    assert set(payload["limits"]) == {
        "memory_mib",
        "max_processes",
        "max_file_mib",
        "tmp_mib",
        "cpu_seconds",
        "max_output_chars",
        "timeout_seconds",
    }
