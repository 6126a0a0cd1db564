"""Run untrusted Python (a model's tool call) in a throw-away interpreter with hard limits.

A tool call must end as an observation, whatever the code does: loop forever, allocate 2 GB,
fork, print without end, open sockets, read /etc/passwd. Each :func:`run_python` call

1. makes a scratch directory (the child's cwd, empty) and a parent-owned one for the code and stdin;
2. when running as root, leases a uid of its own from ``SANDBOX_UIDS`` (an flock per uid, so
   concurrent calls of several processes never share one, and a uid that some process already
   uses is skipped);
3. starts ``python -I -S -B -u sandbox_child.py`` in a new session with a minimal environment;
   the child limits itself (CPU, memory, file size, processes), isolates itself as far as the
   machine allows (namespaces, private tmpfs, the leased uid) and installs an audit hook before
   running the code (:mod:`flowrl.envs.sandbox_child` says what, and in which order);
4. reads stdout and stderr through pipes, keeping the head of stdout and the tail of stderr and
   dropping the rest, until the child exits or the wall clock runs out;
5. kills the child's process group and every process of the leased uid, reaps the child and
   deletes both directories; nothing the code wrote survives.

The child's report (a status pipe) and its exit (code or signal, CPU time) give the status.
Calls share no state but the uid leases, so any number of threads may call at once.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("sandbox_child.py")
STATUSES = ("ok", "error", "timeout", "cpu_limit", "memory_limit", "blocked", "killed")
# uids leased to calls when the parent runs as root; pick a range no account on your hosts uses
# (61184-65519 is systemd's DynamicUser range, 65534 is nobody).
SANDBOX_UIDS = range(60100, 61100)
LEASE_DIR = os.path.join(tempfile.gettempdir(), "flowrl-sandbox-uids")
# False: no namespaces and no uid of its own, only rlimits, the process group and the audit hook
# (what a machine without root or user namespaces gets); the tests use it to check that fallback.
OS_ISOLATION = True
DRAIN_S = 0.5  # after the kill: how long to wait for the pipes' last bytes
MIN_MEMORY_MB = 64  # the child interpreter itself needs about 30 MB of address space


@dataclass(frozen=True)
class SandboxLimits:
    """What one call may use. CPU seconds are whole seconds for the kernel (rounded up)."""

    wall_s: float = 5.0  # wall clock, then the process group is killed ("timeout")
    cpu_s: float = 2.0  # CPU time, RLIMIT_CPU ("cpu_limit")
    memory_mb: int = 256  # address space, RLIMIT_AS ("memory_limit")
    max_output_chars: int = 2000  # kept of stdout (its head) and of stderr (its tail)
    max_processes: int = 16  # RLIMIT_NPROC, where the call has a uid of its own (root parent)
    scratch_mb: int = 64  # size of the private tmpfs scratch, else the largest file (RLIMIT_FSIZE)

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"SandboxLimits.{name}={value!r} must be a positive number of seconds")
        for name in ("memory_mb", "max_output_chars", "max_processes", "scratch_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name}={value!r} must be a positive integer")
        if self.memory_mb < MIN_MEMORY_MB:
            raise ValueError(
                f"SandboxLimits.memory_mb={self.memory_mb} is below {MIN_MEMORY_MB}: the interpreter itself "
                "needs about 30 MB"
            )


@dataclass(frozen=True)
class SandboxResult:
    ok: bool
    stdout: str  # the head of stdout, at most max_output_chars characters
    stderr: str  # the tail of stderr (a traceback's last line is kept), at most max_output_chars
    status: str  # one of STATUSES: ok | error | timeout | cpu_limit | memory_limit | blocked | killed
    seconds: float  # wall clock of the whole call
    detail: str = ""  # why it failed, one line: "timeout after 5 s", "exit code 1"; "" when ok
    stdout_cut: int = 0  # bytes of stdout dropped
    stderr_cut: int = 0  # bytes of stderr dropped (from its start)
    isolation: tuple[str, ...] = ()  # in effect: netns | userns, tmpfs, uid=N[+read], audit

    def observation(self) -> str:
        """The text the model sees: stdout, and on failure the stderr tail and a one-line reason."""
        parts = [self.stdout + (f"\n[... {self.stdout_cut} more bytes of output]" if self.stdout_cut else "")]
        if not self.ok:
            parts.append((f"[... {self.stderr_cut} bytes]\n" if self.stderr_cut else "") + self.stderr)
            parts.append(f"[{self.detail}]")
        return "\n".join(p.rstrip("\n") for p in parts if p)


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), stdin: str = "") -> SandboxResult:
    """Run ``code`` in a fresh sandboxed interpreter (module docstring); never raises for what
    the code does."""
    start = time.monotonic()
    with _uid_lease() as uid, _temporary_dir("flowrl-sandbox-") as scratch, _temporary_dir("flowrl-io") as io:
        try:
            child = _Child.spawn(code, stdin, scratch, io, uid, limits)
        except OSError as e:
            detail = f"the sandbox could not start: {e}"
            return SandboxResult(False, "", "", "error", time.monotonic() - start, detail)
        child.supervise(start + limits.wall_s)
    return child.result(limits, time.monotonic() - start)


# ---- output -----------------------------------------------------------------------------------
class _Capture:
    """The first (``head``) or last ``limit`` bytes of a stream, and how many came in all."""

    def __init__(self, limit: int, head: bool) -> None:
        self.limit, self.head = limit, head
        self.data = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.head:
            self.data += chunk[: max(0, self.limit - len(self.data))]
        else:
            self.data += chunk
            if len(self.data) > 2 * self.limit:
                del self.data[: len(self.data) - self.limit]

    def text(self, max_chars: int) -> tuple[str, int]:
        """(text of at most max_chars characters, bytes dropped)."""
        data = bytes(self.data if self.head else self.data[-self.limit :])
        text = data.decode("utf-8", "replace")
        text = text[:max_chars] if self.head else text[-max_chars:]
        return text, max(0, self.total - len(text.encode("utf-8", "replace")))


# ---- the child process ------------------------------------------------------------------------
class _Child:
    """One sandboxed interpreter: its pipes while it runs, then how it ended."""

    def __init__(self, process: subprocess.Popen[bytes], pipes: dict[int, _Capture], uid: int) -> None:
        self.process, self.pipes, self.uid = process, pipes, uid
        self.stdout, self.stderr, self.status = pipes.values()  # keyed by fd, in this order
        self.ended: set[int] = set()  # pipes at their end
        self.timed_out = False
        self.exit_code: int | None = 0  # None: its exit status was lost
        self.cpu_s = 0.0

    @classmethod
    def spawn(
        cls, code: str, stdin: str, scratch: str, private: str, uid: int, limits: SandboxLimits
    ) -> _Child:
        code_path, stdin_path = os.path.join(private, "code.py"), os.path.join(private, "stdin")
        Path(code_path).write_text(code, encoding="utf-8")
        Path(stdin_path).write_text(stdin, encoding="utf-8")
        (out_r, out_w), (err_r, err_w), (status_r, status_w) = os.pipe(), os.pipe(), os.pipe()
        args = {
            "code": code_path, "scratch": scratch, "status_fd": status_w, "parent": os.getpid(), "uid": uid,
            "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "max_processes": limits.max_processes,
            "scratch_mb": limits.scratch_mb, "namespaces": int(OS_ISOLATION),
        }  # fmt: skip
        command = [sys.executable or "python3", "-I", "-S", "-B", "-u", str(CHILD)]
        try:
            with open(stdin_path, "rb") as stdin_file:
                process = subprocess.Popen(
                    [*command, *(f"{k}={v}" for k, v in args.items())],
                    stdin=stdin_file, stdout=out_w, stderr=err_w, pass_fds=(status_w,), cwd=scratch,
                    env=_child_env(scratch), start_new_session=True,
                )  # fmt: skip
        except BaseException:
            for fd in (out_r, err_r, status_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, status_w):
                os.close(fd)
        chars = limits.max_output_chars
        pipes = {out_r: _Capture(4 * chars, head=True), err_r: _Capture(4 * chars, head=False)}
        pipes[status_r] = _Capture(1 << 16, head=True)
        return cls(process, pipes, uid)

    def supervise(self, deadline: float) -> None:
        """Read the pipes until the child exits or the deadline; then kill everything it left and reap."""
        pid = self.process.pid
        try:
            self.timed_out = not self._pump(deadline, until_exit=True)
        finally:
            _kill_group(pid)
            if self.uid >= 0:
                _kill_uid(self.uid)
            try:
                self._pump(time.monotonic() + DRAIN_S, until_exit=False)
            finally:
                for fd in self.pipes:
                    os.close(fd)
                self._reap()

    def _reap(self) -> None:
        try:
            _, wait_status, usage = os.wait4(self.process.pid, 0)
        except ChildProcessError:  # some other code of this process reaped it (os.wait())
            self.exit_code = self.process.returncode = None
            return
        self.exit_code = self.process.returncode = os.waitstatus_to_exitcode(wait_status)
        self.cpu_s = usage.ru_utime + usage.ru_stime

    def _pump(self, deadline: float, until_exit: bool) -> bool:
        """Feed the captures until the child has exited (until_exit) or every pipe is at its end;
        False if the deadline came first."""
        with selectors.DefaultSelector() as selector, _pidfd(self.process.pid) as pidfd:
            for fd in self.pipes.keys() - self.ended:
                selector.register(fd, selectors.EVENT_READ)
            if until_exit and pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ)
            poll_s = 0.05 if until_exit and pidfd is None else math.inf  # no pidfd: poll for the exit
            while not (_exited(self.process.pid) if until_exit else self.ended >= self.pipes.keys()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for key, _ in selector.select(min(left, poll_s)):
                    if key.fd in self.pipes and not self._read(key.fd):
                        selector.unregister(key.fd)
                        self.ended.add(key.fd)
        return True

    def _read(self, fd: int) -> bool:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        self.pipes[fd].feed(chunk)
        return bool(chunk)

    def result(self, limits: SandboxLimits, seconds: float) -> SandboxResult:
        stdout, stdout_cut = self.stdout.text(limits.max_output_chars)
        stderr, stderr_cut = self.stderr.text(limits.max_output_chars)
        report = bytes(self.status.data).decode("utf-8", "replace").splitlines()
        ready = [line.split()[1:] for line in report if line.startswith("ready")]
        status, detail = _classify(self, report, bool(ready), stderr, limits)
        isolation = tuple(ready[0]) if ready else ()
        return SandboxResult(
            status == "ok", stdout, stderr, status, seconds, detail, stdout_cut, stderr_cut, isolation
        )


def _classify(
    child: _Child, report: list[str], ready: bool, stderr: str, limits: SandboxLimits
) -> tuple[str, str]:
    """(status, detail) from the wall clock, the child's report, and how it exited."""
    code = child.exit_code
    if child.timed_out:
        return "timeout", f"timeout after {limits.wall_s:g} s"
    if code is None:
        return "killed", "its exit status was lost (another part of this process reaped it)"
    blocked = [line.removeprefix("blocked ") for line in report if line.startswith("blocked ")]
    if blocked and code != 0:
        return "blocked", f"blocked: {blocked[0]}"
    memory = f"memory limit {limits.memory_mb} MB exceeded"
    if "memory" in report and code != 0:
        return "memory_limit", memory
    # RLIMIT_CPU kills with SIGKILL; rusage may count a little less than the limit at that moment
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and child.cpu_s >= 0.8 * math.ceil(limits.cpu_s)):
        return "cpu_limit", f"cpu limit {limits.cpu_s:g} s exceeded"
    if code < 0:
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            return "memory_limit", memory
        return "killed", f"killed by {_signal_name(-code)}"
    if code != 0:
        return "error", f"exit code {code}"
    if not ready:
        return "error", "the sandbox failed to start"
    return "ok", ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---- processes --------------------------------------------------------------------------------
@contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    """A descriptor that becomes readable when the process exits (Linux >= 5.3), else None."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _exited(pid: int) -> bool:
    """Has the child exited? It stays a zombie (not reaped), so its process group id stays ours."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped by some other code of this process
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is ``uid``, from /proc."""
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:  # no /proc: nothing to find (the process group and namespaces still hold)
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:  # it exited meanwhile
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        zombie = fields.get("State", "").strip().startswith("Z")
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not zombie:
            found.append(int(name))
    return found


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of the call's own uid, including any that left the process group."""
    for _ in range(100):  # each round kills all it sees; new ones are bounded by RLIMIT_NPROC
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)
    log.warning("sandbox: processes of uid %d survived 100 rounds of SIGKILL", uid)


# ---- uids and directories ---------------------------------------------------------------------
def _lease_dir() -> str | None:
    """The directory of lock files, if it is root's own (a symlink or someone else's is refused)."""
    try:
        os.mkdir(LEASE_DIR, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    info = os.lstat(LEASE_DIR)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o077:
        return None
    return LEASE_DIR


@contextmanager
def _uid_lease() -> Iterator[int]:
    """A uid that no other call (of any process) and no running process uses, held for the block;
    -1 when this process is not root or none is free."""
    directory = _lease_dir() if os.geteuid() == 0 and OS_ISOLATION else None
    lease = _take_uid(directory) if directory is not None else None
    if lease is None:
        yield -1
        return
    uid, lock = lease
    try:
        yield uid
    finally:
        os.close(lock)  # releases it, after the caller killed the uid's processes


def _take_uid(directory: str) -> tuple[int, int] | None:
    """(uid, its locked lock file's fd), trying the range from a random point."""
    offset = random.randrange(len(SANDBOX_UIDS))
    for i in range(len(SANDBOX_UIDS)):
        uid = SANDBOX_UIDS[(offset + i) % len(SANDBOX_UIDS)]
        try:
            fd = os.open(os.path.join(directory, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            log.warning("sandbox: cannot lock uids in %s (%s); running without one", directory, e)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _processes_of(uid):  # else an account uses it: leave it alone
                return uid, fd
        except BlockingIOError:  # another call holds it
            pass
        os.close(fd)
    log.warning("sandbox: no free uid in %s; running without one", SANDBOX_UIDS)
    return None


@contextmanager
def _temporary_dir(prefix: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        _remove_tree(path)


def _remove_tree(path: str) -> None:
    """Delete a directory tree, also one the code made unreadable (chmod 0) for a non-root parent."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    os.chmod(path, 0o700)
    for parent, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(parent, name)
            if not os.path.islink(child):
                os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("sandbox: could not delete %s", path)


def _child_env(scratch: str) -> dict[str, str]:
    """A minimal environment: none of the parent's variables (tokens, keys) reach the code."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
            "MALLOC_ARENA_MAX": "2"}  # fmt: skip
