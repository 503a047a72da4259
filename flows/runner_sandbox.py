"""Bubblewrap command line and process setup for the child interpreter of `python-runner`.

The sandbox gets its own user, PID, network, IPC, UTS and cgroup namespaces. Its filesystem is
an empty read-only root with only these parts of the host, read-only: `/usr`, the top-level
`/bin`, `/sbin` and `/lib*` links, the base interpreter's prefix and a few files of `/etc`.
`/etc/passwd`, `/etc/group`, `/etc/hosts` and `/etc/nsswitch.conf` are written for the
sandbox. The project folder, the Prefect home, the stack's state folder and the worker's
virtualenv are not mounted. `/tmp` and `/dev/shm` are private tmpfs mounts, which disappear
with the sandbox. The network namespace has only a loopback interface, so no host address is
reachable, 127.0.0.1 included.

When the worker runs as root, the sandbox runs as the unprivileged uid and gid 65534. Its
processes then count against RLIMIT_NPROC, which the kernel does not apply to uid 0, and they
own no file on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

BUBBLEWRAP = "bubblewrap"
NO_SANDBOX = "none"
SANDBOX_MODES = (BUBBLEWRAP, NO_SANDBOX)

SANDBOX_TMP = "/tmp"
SANDBOX_SCRIPT = "/tmp/main.py"
SANDBOX_ENTRY = "/run/python-runner/sandbox_entry.py"
SANDBOX_HOSTNAME = "python-runner"
# User and group "nobody" on Debian and most other distributions.
UNPRIVILEGED_ID = 65534

# Host paths shared read-only. A path that is a symlink on the host (as /bin, /lib and /lib64
# are with a merged /usr) becomes the same symlink in the sandbox.
SYSTEM_DIRS = ("/usr",)
TOP_LEVEL_PATHS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The dynamic loader's cache, the time zone, and the targets of Debian's command alternatives
# such as /usr/bin/awk.
HOST_ETC_PATHS = ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives")

BWRAP_INSTALL_HINT = (
    "install bubblewrap (Debian and Ubuntu: apt-get install bubblewrap; Fedora: dnf install"
    " bubblewrap), or set PYTHON_RUNNER_SANDBOX=none to run code without a sandbox"
)
USERNS_HINT = (
    "bubblewrap needs unprivileged user namespaces: check that the sysctl"
    " user.max_user_namespaces is above 0, kernel.unprivileged_userns_clone is 1 where it"
    " exists, and kernel.apparmor_restrict_unprivileged_userns is 0 where it exists (Ubuntu"
    " 23.10 and later); inside a container, allow the unshare and mount system calls."
    " Alternatively set PYTHON_RUNNER_SANDBOX=none to run code without a sandbox"
)

# From <sched.h> and <sys/mount.h>.
CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
# From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

MIB = 1024 * 1024
# Status line written by the pre-exec hook when it fails.
SETUP_ERROR = "setup-error"


class SandboxUnavailable(RuntimeError):
    """Bubblewrap is missing or cannot create the sandbox on this machine."""


@dataclass(frozen=True)
class BubblewrapFeatures:
    """Options of the installed bubblewrap that older releases lack."""

    path: str
    tmpfs_size: bool
    disable_userns: bool


def find_bubblewrap() -> BubblewrapFeatures:
    """Locate `bwrap` and read which options it supports.

    Raises SandboxUnavailable when it is not installed.
    """
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/bin:/usr/bin:/bin"])
    path = shutil.which("bwrap", path=search_path)
    if path is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: {BWRAP_INSTALL_HINT}")
    return _read_features(path)


@functools.lru_cache(maxsize=4)
def _read_features(path: str) -> BubblewrapFeatures:
    try:
        usage = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise SandboxUnavailable(f"failed to run {path} --help: {error}") from error
    return BubblewrapFeatures(
        path=path,
        tmpfs_size="--size" in usage,
        disable_userns="--disable-userns" in usage,
    )


def base_interpreter() -> str:
    """Return the real path of the Python that the running virtualenv, if any, was made from."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def interpreter_prefixes(interpreter: str) -> list[str]:
    """Return the installation folders that `interpreter` needs besides the system folders.

    For the runner's own base interpreter these are `sys.base_prefix` and
    `sys.base_exec_prefix`. Any other interpreter is assumed to sit in `<prefix>/bin`.
    """
    if os.path.realpath(interpreter) == base_interpreter():
        candidates = [sys.base_prefix, sys.base_exec_prefix]
    else:
        candidates = [os.path.dirname(os.path.dirname(os.path.realpath(interpreter)))]
    prefixes: list[str] = []
    for prefix in map(os.path.realpath, candidates):
        if not _is_within(prefix, SYSTEM_DIRS) and prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def _is_within(path: str, folders: tuple[str, ...]) -> bool:
    return any(path == folder or path.startswith(folder + "/") for folder in folders)


def sandbox_ids() -> tuple[int, int]:
    """Return the uid and gid that bubblewrap runs as: 65534 for a root worker, else its own."""
    if os.geteuid() == 0:
        return UNPRIVILEGED_ID, UNPRIVILEGED_ID
    return os.getuid(), os.getgid()


@dataclass
class SandboxFiles:
    """Files given to bubblewrap as memory file descriptors, closed by `close`."""

    fds: list[int] = field(default_factory=list)

    def add(self, name: str, content: bytes) -> int:
        """Create an unnamed file holding `content` and return its descriptor."""
        fd = os.memfd_create(name, 0)
        self.fds.append(fd)
        os.write(fd, content)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def close(self) -> None:
        """Close every descriptor created by `add`."""
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@dataclass(frozen=True)
class SandboxSpec:
    """Everything that `bubblewrap_arguments` turns into options."""

    features: BubblewrapFeatures
    # (host folder, sandbox path) pairs for the interpreter's prefixes, mounted read-only.
    prefix_mounts: list[tuple[str, str]]
    environment: dict[str, str]
    tmp_mib: int
    uid: int
    gid: int


def bubblewrap_arguments(spec: SandboxSpec, files: SandboxFiles, script: bytes,
                         entry: bytes) -> list[str]:
    """Build bubblewrap's options up to, but not including, the command to run.

    The descriptors for `script`, `entry` and the generated `/etc` files are added to `files`,
    and must be passed to the child.
    """
    options = _namespace_options(spec.features)
    options += _host_filesystem_options(spec.prefix_mounts)
    options += _etc_options(files, spec.uid, spec.gid)
    options += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    options += _tmpfs_options(spec.features, "/dev/shm", spec.tmp_mib)
    options += _tmpfs_options(spec.features, SANDBOX_TMP, spec.tmp_mib)
    options += ["--perms", "0644", "--file", str(files.add("main.py", script)), SANDBOX_SCRIPT]
    options += ["--ro-bind-data", str(files.add("sandbox_entry.py", entry)), SANDBOX_ENTRY]
    options += ["--remount-ro", "/", "--chdir", SANDBOX_TMP, "--clearenv"]
    for name, value in sorted(spec.environment.items()):
        options += ["--setenv", name, value]
    return options


def _namespace_options(features: BubblewrapFeatures) -> list[str]:
    options = [
        "--unshare-all",
        "--unshare-user",
        "--hostname",
        SANDBOX_HOSTNAME,
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
    ]
    if features.disable_userns:
        options.append("--disable-userns")
    return options


def _host_filesystem_options(prefix_mounts: list[tuple[str, str]]) -> list[str]:
    options: list[str] = []
    for folder in SYSTEM_DIRS:
        options += ["--ro-bind", folder, folder]
    for path in TOP_LEVEL_PATHS + HOST_ETC_PATHS:
        if os.path.islink(path):
            options += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            options += ["--ro-bind", path, path]
    for source, destination in prefix_mounts:
        options += ["--ro-bind", source, destination]
    return options


def _etc_options(files: SandboxFiles, uid: int, gid: int) -> list[str]:
    generated = {
        "/etc/passwd": f"sandbox:x:{uid}:{gid}:python-runner sandbox:{SANDBOX_TMP}:/bin/sh\n",
        "/etc/group": f"sandbox:x:{gid}:\n",
        "/etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "/etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }
    options: list[str] = []
    for path, content in generated.items():
        fd = files.add(os.path.basename(path), content.encode())
        options += ["--ro-bind-data", str(fd), path]
    return options


def _tmpfs_options(features: BubblewrapFeatures, path: str, size_mib: int) -> list[str]:
    if not features.tmpfs_size:
        return ["--tmpfs", path]
    return ["--size", str(size_mib * MIB), "--tmpfs", path]


def drop_root_hook(staged_prefixes: list[tuple[str, str]], status_fd: int) -> Callable[[], None]:
    """Build a pre-exec hook for a root worker: mount each prefix on its staging folder, then
    switch to uid and gid 65534 before bubblewrap starts.

    `staged_prefixes` contains (prefix, staging folder) pairs. The interpreter often lives under
    a folder that uid 65534 cannot enter (pyenv under /root, for example), and bubblewrap
    opens its mount sources with the caller's permissions. So the hook, still root, gives the
    child a private mount namespace and mounts each prefix on a staging folder that every
    user can enter. The mounts exist only in that namespace. A failure is written to
    `status_fd` as `setup-error MESSAGE`, because Popen reports only that the hook failed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    mounts = [(prefix.encode(), staging.encode()) for prefix, staging in staged_prefixes]

    def check(result: int, action: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{action} failed: {os.strerror(errno)}")

    def bind_prefixes_then_drop_root() -> None:
        if mounts:
            check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
        for prefix, staging in mounts:
            check(libc.mount(prefix, staging, None, MS_BIND | MS_REC, None), "bind mount")
        os.setgroups([])
        os.setresgid(UNPRIVILEGED_ID, UNPRIVILEGED_ID, UNPRIVILEGED_ID)
        os.setresuid(UNPRIVILEGED_ID, UNPRIVILEGED_ID, UNPRIVILEGED_ID)

    def report_failure() -> None:
        try:
            bind_prefixes_then_drop_root()
        except OSError as error:
            os.write(status_fd, f"{SETUP_ERROR} {error}\n".encode())
            raise

    return report_failure


def parent_death_signal_hook() -> Callable[[], None] | None:
    """Build a pre-exec hook that makes the kernel SIGKILL the child when the runner dies.

    Returns None where prctl is unavailable (not Linux, or no libc to load). The kernel sends
    the signal when the thread that started the child exits, and that thread waits for the
    child, so this only fires when the runner dies. A change of the child's uid or gid clears
    the setting, so the hook must run after any such change.
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


def become_child_subreaper() -> None:
    """Make orphaned descendants of this process its children, so it can reap them.

    bubblewrap exits as soon as the code's main process has exited, without waiting for the
    sandbox's init, which then dies too. Without this, that init is reparented to the
    machine's PID 1, and a PID 1 that does not reap (a worker running as PID 1 in a
    container, for example) collects one zombie per job. Does nothing where prctl fails.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphaned_init(info: str, timeout_seconds: float) -> None:
    """Reap the sandbox's init, named as `child-pid` in bubblewrap's `--info-fd` output.

    Waits up to `timeout_seconds` for it to exit. Returns at once when the info contains no pid
    or the init is not a child of this process, for example when it was already reaped.
    """
    match = re.search(r'"child-pid":\s*(\d+)', info)
    if match is None:
        return
    pid = int(match.group(1))
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG) is not None:
                return
        except ChildProcessError:
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.005)


def chain_hooks(*hooks: Callable[[], None] | None) -> Callable[[], None] | None:
    """Combine pre-exec hooks into one that runs them in order, skipping None."""
    present = [hook for hook in hooks if hook is not None]
    if not present:
        return None

    def run_all() -> None:
        for hook in present:
            hook()

    return run_all


def signal_sandboxed_code(bwrap_pid: int, signum: signal.Signals) -> None:
    """Send `signum` to the main process of the code in the sandbox that `bwrap_pid` started.

    bubblewrap's child is the sandbox's init (PID 1 inside), and the code's interpreter is its
    child. The signal goes through a pidfd, and only after the pidfd's process was checked to
    still be a child of the init, so a pid reused by another process is never signalled.
    """
    for init_pid in child_pids(bwrap_pid):
        for code_pid in child_pids(init_pid):
            _signal_if_child_of(code_pid, init_pid, signum)


def _signal_if_child_of(pid: int, parent_pid: int, signum: signal.Signals) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if _parent_pid(pid) == parent_pid:
            signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def child_pids(parent_pid: int) -> list[int]:
    """Return the pids of the processes whose parent is `parent_pid`, read from /proc."""
    return [pid for pid in _all_pids() if _parent_pid(pid) == parent_pid]


def _all_pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces. The state and the parent
    # pid follow the last closing parenthesis.
    return int(fields.rsplit(b")", 1)[1].split()[1])
