"""Process plumbing of the python-runner flow: output capture, pipes and stopping a child.

Nothing here depends on the sandbox. The functions work on a child started in its own
session, whose pid is also its process group id.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

READ_CHUNK_BYTES = 64 * 1024
# Maximum bytes read from a status pipe. The child writes a few short lines.
MAX_PIPE_BYTES = 64 * 1024
# Maximum sleep between checks while waiting for the child to exit.
MAX_POLL_INTERVAL_SECONDS = 0.05


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


class StatusPipe:
    """A pipe whose write end goes to the child and whose read end is read after it exits."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()

    def __enter__(self) -> StatusPipe:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close_write_end()
        os.close(self.read_fd)

    def close_write_end(self) -> None:
        """Close this process's write end, so reads reach EOF once the child's copies close."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def read_text(self) -> str:
        """Read what the child wrote, without waiting for writers that are still alive.

        Without the sandbox, a process the code detached can still hold the pipe open.
        """
        os.set_blocking(self.read_fd, False)
        data = b""
        with contextlib.suppress(BlockingIOError):
            while len(data) < MAX_PIPE_BYTES:
                chunk = os.read(self.read_fd, READ_CHUNK_BYTES)
                if not chunk:
                    break
                data += chunk
        return data[:MAX_PIPE_BYTES].decode("utf-8", errors="replace")

    def read_lines(self) -> list[str]:
        """Read what the child wrote, split into lines."""
        return self.read_text().splitlines()


def start_reader(stream: BinaryIO | None, capture: OutputCapture) -> threading.Thread:
    if stream is None:
        raise ValueError("the child's output pipe is missing")
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


def join_readers(readers: list[threading.Thread], timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()))


def wait_or_stop(
    pid: int, timeout_seconds: float, grace_seconds: float, terminate: Callable[[int], None]
) -> bool:
    """Wait for the child to exit, stopping it at the timeout.

    `terminate(pid)` sends the code a stop request, and SIGKILL to the child's process group
    follows after `grace_seconds`. Returns whether the timeout was reached. The child is left
    unreaped.
    """
    if _wait_without_reaping(pid, timeout_seconds):
        return False
    terminate(pid)
    if not _wait_without_reaping(pid, grace_seconds):
        signal_group(pid, signal.SIGKILL)
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


def signal_group(pgid: int, signum: signal.Signals) -> None:
    # The group is gone once every member has exited.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


@contextlib.contextmanager
def kill_group_on_default_sigterm(pgid: int) -> Iterator[None]:
    """Kill the child's process group before a SIGTERM ends this process.

    This matters when SIGTERM has its default action, which ends the process without running
    `finally` blocks. A Python handler that is already installed is left in place. Prefect
    3.9's flow engine installs one while a flow runs, which raises TerminationSignal, and the
    worker only acknowledges a cancel request while that handler is installed. The exception
    reaches the `finally` in `_Job._supervise`, which kills the group. Signal handlers can only
    be set from the main thread, so elsewhere nothing is installed.

    After a SIGKILL of this process only the parent-death signal acts, and it reaches the
    direct child alone. In the sandbox that is enough: bubblewrap's death kills the sandbox's
    init, which ends every process in it. NOTE: without the sandbox, processes the code
    started can outlive a SIGKILL of the runner.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def kill_group_then_terminate(signum: int, _frame: object) -> None:
        signal_group(pgid, signal.SIGKILL)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, kill_group_then_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


