"""Tests of `run_code`, the part of the python-runner flow that runs code in a child process.

They start real child interpreters but no Prefect server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from python_runner import (
    OutputCapture,
    RunnerError,
    RunnerSettings,
    run_code,
    truncation_marker,
)

FAST = RunnerSettings(interpreter=sys.executable, max_output_chars=100_000, kill_grace_seconds=0.5)


def run(code: str, timeout_seconds: float = 10.0, settings: RunnerSettings = FAST):
    return run_code(code, timeout_seconds, settings)


def process_is_running(pid: int) -> bool:
    """Return whether `pid` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state letter follows the command name, which is in parentheses.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z"


def wait_until_gone(pid: int, timeout_seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if not process_is_running(pid):
            return True
        time.sleep(0.02)
    return False


def test_print_returns_stdout():
    result = run("print('hi')")

    assert result.stdout == "hi\n"
    assert result.stderr == ""
    assert result.exit_code == 0
    assert result.timed_out is False
    assert result.stdout_truncated is False
    assert result.stderr_truncated is False


def test_input_gets_eof_at_once():
    started = time.monotonic()
    result = run('print("hi", input("name? "))')

    assert time.monotonic() - started < 2.0
    assert "EOFError" in result.stderr
    assert result.exit_code == 1
    assert result.timed_out is False


def test_os_exit_code_reported():
    result = run('import os; print("side-effect", flush=True); os._exit(3)')

    assert result.exit_code == 3
    assert result.stdout == "side-effect\n"


def test_both_streams_and_system_exit():
    result = run('import sys; print("out"); print("err", file=sys.stderr); raise SystemExit(1)')

    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 1


def test_output_cut_at_limit_with_marker():
    settings = RunnerSettings(sys.executable, max_output_chars=1000, kill_grace_seconds=0.5)
    result = run('print("A" * 2_000_000)', settings=settings)

    assert result.exit_code == 0
    assert result.stdout_truncated is True
    assert result.stderr_truncated is False
    assert result.stdout == "A" * 1000 + truncation_marker(1000)
    assert "output truncated after 1000 characters" in result.stdout


def test_many_small_writes_are_cut_at_limit():
    settings = RunnerSettings(sys.executable, max_output_chars=5000, kill_grace_seconds=0.5)
    result = run("for i in range(300000): print(i)", settings=settings)

    expected = "".join(f"{i}\n" for i in range(300000))[:5000]
    assert result.exit_code == 0
    assert result.stdout_truncated is True
    assert result.stdout == expected + truncation_marker(5000)


def test_output_at_limit_not_truncated():
    settings = RunnerSettings(sys.executable, max_output_chars=10, kill_grace_seconds=0.5)
    result = run('print("123456789")', settings=settings)

    assert result.stdout == "123456789\n"
    assert result.stdout_truncated is False


def test_truncation_keeps_characters_whole():
    # 7 ASCII characters then 3-byte and 4-byte characters, so the byte and character
    # positions of the limit differ.
    code = 'import sys; sys.stdout.write("abcdefg" + "\\u65e5\\U0001F600" * 50)'
    settings = RunnerSettings(sys.executable, max_output_chars=10, kill_grace_seconds=0.5)
    result = run(code, settings=settings)

    assert result.stdout_truncated is True
    assert result.stdout == "abcdefg\u65e5\U0001F600\u65e5" + truncation_marker(10)
    assert "\ufffd" not in result.stdout


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


def test_invalid_utf8_becomes_replacement():
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


def test_incomplete_final_character_replaced():
    result = run('import sys; sys.stdout.buffer.write(b"end \\xe6\\x97")')

    assert result.stdout == "end \ufffd"


def test_timeout_stops_busy_loop():
    started = time.monotonic()
    result = run('print("before", flush=True)\nwhile True: pass', timeout_seconds=1.0)
    elapsed = time.monotonic() - started

    assert result.timed_out is True
    assert result.exit_code == -15
    assert result.stdout == "before\n"
    assert elapsed < 3.0


def test_timeout_kills_sigterm_ignoring_code():
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(999)\n"
    )
    started = time.monotonic()
    result = run(code, timeout_seconds=0.5)
    elapsed = time.monotonic() - started

    assert result.timed_out is True
    assert result.exit_code == -9
    assert elapsed < 0.5 + FAST.kill_grace_seconds + 1.0


def test_timeout_kills_whole_process_tree():
    code = (
        "import subprocess, time\n"
        'shell = subprocess.Popen(["sh", "-c", "sleep 999 & echo $!; wait"],'
        " stdout=subprocess.PIPE, text=True)\n"
        "print(shell.pid, shell.stdout.readline().strip(), flush=True)\n"
        "time.sleep(999)\n"
    )
    result = run(code, timeout_seconds=1.5)
    shell_pid, sleep_pid = (int(pid) for pid in result.stdout.split())

    assert result.timed_out is True
    assert wait_until_gone(shell_pid)
    assert wait_until_gone(sleep_pid)


def test_background_child_killed_after_exit():
    code = (
        "import subprocess\n"
        'child = subprocess.Popen(["sleep", "1000"])\n'
        'print(child.pid, flush=True)\n'
        'print("bye")\n'
    )
    started = time.monotonic()
    result = run(code)
    elapsed = time.monotonic() - started
    sleep_pid = int(result.stdout.split()[0])

    assert result.stdout.endswith("bye\n")
    assert result.exit_code == 0
    assert result.timed_out is False
    assert elapsed < 2.0
    assert wait_until_gone(sleep_pid)


def test_detached_grandchild_does_not_hang():
    # The grandchild leaves the process group, so killing the group misses it, and it keeps
    # stdout open. The runner must still return after its bounded wait for the readers.
    code = (
        "import subprocess\n"
        'child = subprocess.Popen(["sleep", "30"], start_new_session=True)\n'
        "print(child.pid, flush=True)\n"
    )
    started = time.monotonic()
    result = run(code)
    elapsed = time.monotonic() - started
    os.kill(int(result.stdout.split()[0]), 9)

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
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if pid_file.exists() and pid_file.read_text():
            return int(pid_file.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{pid_file} was not written within {timeout_seconds} s")


class Terminated(Exception):
    pass


def test_sigterm_exception_kills_process_tree(tmp_path):
    # Prefect's flow engine handles SIGTERM by raising an exception in the main thread.
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
            run(write_pid_and_sleep_code(pid_file), timeout_seconds=30)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert wait_until_gone(read_pid_when_written(pid_file))


def test_default_sigterm_kills_process_tree(tmp_path):
    pid_file = tmp_path / "sleep.pid"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from python_runner import run_code\n"
        "run_code(sys.argv[2], 30)\n"
    )
    flows_dir = str(Path(__file__).resolve().parents[1])
    code = write_pid_and_sleep_code(pid_file)
    runner = subprocess.Popen([sys.executable, "-c", script, flows_dir, code])
    sleep_pid = read_pid_when_written(pid_file, timeout_seconds=15)
    runner.send_signal(signal.SIGTERM)

    assert runner.wait(timeout=10) == -signal.SIGTERM
    assert wait_until_gone(sleep_pid)


def test_environment_is_allowlist_only(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.setenv("PREFECT_API_KEY", "secret")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///x.db")
    result = run("import os; print(sorted(os.environ))")

    assert result.stdout == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']\n"


def test_workdir_is_home_and_tmpdir():
    code = (
        "import os, tempfile\n"
        "print(os.getcwd())\n"
        "print(os.environ['HOME'])\n"
        "print(os.environ['TMPDIR'])\n"
        "path = tempfile.mkstemp()[1]\n"
        "open(path, 'w').write('ok')\n"
        "print(open(path).read())\n"
    )
    result = run(code)
    workdir, home, tmpdir, written = result.stdout.splitlines()

    assert home == workdir
    assert tmpdir == workdir
    assert written == "ok"
    assert not os.path.exists(workdir)


def test_missing_interpreter_raises_runner_error():
    settings = RunnerSettings("/nonexistent/python3", max_output_chars=100, kill_grace_seconds=0.5)

    with pytest.raises(RunnerError, match="/nonexistent/python3"):
        run("print('hi')", settings=settings)


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_seconds"):
        run("print('hi')", timeout_seconds=0)


def test_settings_read_from_environment():
    settings = RunnerSettings.from_env(
        {
            "PYTHON_RUNNER_INTERPRETER": "/usr/bin/python3",
            "PYTHON_RUNNER_MAX_OUTPUT_CHARS": "50",
            "PYTHON_RUNNER_KILL_GRACE_SECONDS": "0.25",
        }
    )

    assert settings == RunnerSettings("/usr/bin/python3", 50, 0.25)


def test_settings_defaults_when_unset():
    settings = RunnerSettings.from_env({})

    assert settings == RunnerSettings(sys.executable, 100_000, 2.0)


@pytest.mark.parametrize(
    "name, value",
    [
        ("PYTHON_RUNNER_MAX_OUTPUT_CHARS", "0"),
        ("PYTHON_RUNNER_MAX_OUTPUT_CHARS", "many"),
        ("PYTHON_RUNNER_KILL_GRACE_SECONDS", "-1"),
        ("PYTHON_RUNNER_KILL_GRACE_SECONDS", "nan"),
    ],
)
def test_settings_reject_invalid_values(name, value):
    with pytest.raises(ValueError, match=name):
        RunnerSettings.from_env({name: value})


def test_payload_has_all_fields():
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
    }
    assert payload["version"] == 1
    assert isinstance(payload["duration_ms"], int)
