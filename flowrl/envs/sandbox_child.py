"""The first code a sandboxed interpreter runs: limits, isolation, an audit hook, then the user's code.

:func:`flowrl.envs.sandbox.run_python` starts ``python -I -S -B -u sandbox_child.py ARGS`` (see
:func:`parse_args`) in a fresh session, with the scratch directory as cwd. In order, this script

1. reads the user's code from a parent-owned file (before anything can be refused);
2. sets resource limits: CPU seconds, address space, file size, open files, no core dumps;
3. isolates what the machine allows, each step optional and reported:
   - as root with CAP_SYS_ADMIN: new network + mount namespaces (``netns``) and a private,
     size-capped ``noexec`` tmpfs on the scratch directory (``tmpfs``);
   - as root: switch to the uid the parent leased for this call (``uid=N``), which makes
     RLIMIT_NPROC hold and lets the parent kill every process of that uid afterwards. When the
     interpreter's files are not readable by other users (a pyenv under /root), the uid keeps
     CAP_DAC_READ_SEARCH (``uid=N+read``): it can read what root reads but write only its own files;
   - otherwise, when unprivileged user namespaces exist: user + network + mount namespaces
     (``userns``), with the same tmpfs;
   - with either kind of namespace, where allowed, a PID namespace too (``pidns``): the code runs
     as its first process, so that every process it leaves is killed when it ends;
   - always: no new privileges on exec, SIGKILL if the parent dies;
4. installs an audit hook (``sys.addaudithook``, which cannot be removed) that refuses network,
   process creation and signals, ctypes and foreign extension modules, and file access outside
   the scratch directory (reads of the interpreter's own library stay allowed). A refusal raises
   :class:`SandboxBlocked` (a PermissionError) in the user's code;
5. runs the code as ``__main__`` and reports how it ended on the parent's status pipe.

The audit hook is a tripwire that turns ordinary attempts into a clear "blocked" result; Python
code that works hard enough can get around audit hooks, so the OS layers above are what hold.
Still, the hook looks up no global or builtin name when it runs (it closes over builtins, C
functions and private read-only copies of its tables), so patching builtins, modules or this
script's globals from the user's code does not change its decisions, and replacing the code or
defaults of this script's functions is refused.

Standard library only, and little of it: every import here is paid on every tool call.
"""

from __future__ import annotations

import builtins
import os
import posix
import resource
import signal
import sys
import types

try:
    import ctypes
except ImportError:  # an interpreter built without it: no namespaces, no uid switch
    ctypes = None  # type: ignore[assignment]

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing costs every call ~10 ms
    from collections.abc import Callable
    from typing import Any

# Linux constants (not all in the os module of 3.11)
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
CAP_DAC_READ_SEARCH = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
PARENT_GONE_EXIT = 137
MAX_OPEN_FILES = 256
# Without a private tmpfs, at most this many files may be opened for writing (each capped by
# RLIMIT_FSIZE), so that a loop cannot fill the host's disk.
MAX_WRITE_OPENS = 32

NETWORK = "network access is not allowed"
PROCESSES_WHY = "creating or signalling processes is not allowed"
OUTSIDE = "file access outside the scratch directory is not allowed: "
NATIVE = "native code (ctypes, extension modules outside the standard library) is not allowed"
LIMITS = "changing resource limits is not allowed"
INTROSPECTION = "inspecting the interpreter's objects through gc is not allowed"
LINKS = "creating links is not allowed"
FUNCTIONS = "changing the sandbox's functions is not allowed"
FUNCTION_PARTS = frozenset({"__code__", "__defaults__", "__kwdefaults__"})

PROCESS_EVENTS = frozenset(
    {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
     "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn"}
)  # fmt: skip
DENIED_IMPORTS = {
    **dict.fromkeys(["ctypes", "_ctypes", "_sqlite3", "_dbm", "_gdbm", "readline", "_tkinter"], NATIVE),
    **dict.fromkeys(
        ["_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters"], PROCESSES_WHY
    ),
}
# Events whose path arguments must lie in the scratch directory (or the read-only roots).
READ_PATH_EVENTS = frozenset(
    {"os.listdir", "os.scandir", "os.chdir", "glob.glob", "os.getxattr", "os.listxattr"}
)
WRITE_PATH_EVENTS = frozenset(
    {"os.mkdir", "os.rmdir", "os.remove", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.utime",
     "os.chflags", "os.lchflags", "os.lchmod", "os.lchown", "os.setxattr", "os.removexattr",
     "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.chown",
     "shutil.move", "shutil.rmtree", "shutil.unpack_archive", "tempfile.mkstemp", "tempfile.mkdtemp",
     "dbm.open"}
)  # fmt: skip
OTHER_EVENTS = {
    "os.symlink": LINKS,
    "os.link": LINKS,
    "resource.setrlimit": LIMITS,
    "resource.prlimit": LIMITS,
    "gc.get_objects": INTROSPECTION,
    "gc.get_referrers": INTROSPECTION,
    "gc.get_referents": INTROSPECTION,
    "code.__new__": "building code objects is not allowed",
    # replacing this script's functions' code or defaults (they are reachable through frames)
    "object.__setattr__": FUNCTIONS,
    "object.__delattr__": FUNCTIONS,
    "sqlite3.enable_load_extension": NATIVE,
}
WATCHED = frozenset(
    {"open", "import"} | PROCESS_EVENTS | READ_PATH_EVENTS | WRITE_PATH_EVENTS | set(OTHER_EVENTS)
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
READABLE_FILES = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"})
EXTRA_READ_ROOTS = ("/usr/share/zoneinfo",)


class SandboxBlocked(PermissionError):
    """An action the sandbox refused; ``str()`` is the reason."""


# ---- arguments and reporting ----------------------------------------------------------------------
def parse_args(argv: list[str]) -> dict[str, str]:
    """``key=value`` arguments: code, scratch, status_fd, parent, uid (-1: none), cpu_s,
    memory_mb, max_processes, scratch_mb, namespaces (0: skip step 3 but for the last item)."""
    return dict(arg.split("=", 1) for arg in argv)


def make_reporter(fd: int) -> Callable[[str], None]:
    def report(line: str, _write: Callable[[int, bytes], int] = posix.write, _fd: int = fd) -> None:
        try:
            _write(_fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    return report


# ---- limits ---------------------------------------------------------------------------------------
def set_limits(cpu_s: float, memory_mb: int, file_mb: int) -> None:
    cpu = max(1, -int(-cpu_s // 1))  # ceil: RLIMIT_CPU counts whole seconds
    for which, soft, hard in [
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_CPU, cpu, cpu),  # SIGKILL (not SIGXCPU, which the code could catch)
        (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
        (resource.RLIMIT_FSIZE, file_mb << 20, file_mb << 20),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
    ]:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:  # lowering is always allowed, raising is not
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))


# ---- isolation ------------------------------------------------------------------------------------
class Libc:
    """The few libc calls the os module of Python 3.11 lacks; each returns True on success."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True) if ctypes is not None else None

    def ok(self, name: str, *args: object) -> bool:
        function = getattr(self.lib, name, None)
        return function is not None and function(*args) == 0

    def set_capabilities(self, mask: int) -> bool:
        """Keep exactly ``mask`` (capabilities 0..31) as permitted and effective."""

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

        data = (Data * 2)()
        data[0].effective = data[0].permitted = mask
        return self.ok("capset", ctypes.byref(Header(LINUX_CAPABILITY_VERSION_3, 0)), data)


def private_tmpfs(libc: Libc, scratch: str, size_mb: int, owner: int) -> bool:
    """Mount a size-capped noexec tmpfs on the scratch directory, visible to this process only."""
    if not libc.ok("mount", None, b"/", None, MS_REC | MS_PRIVATE, None):  # no propagation to the host
        return False
    options = f"size={size_mb}m,mode=0700,uid={owner},gid={owner}".encode()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    mounted = libc.ok("mount", b"tmpfs", scratch.encode(), b"tmpfs", flags, options)
    os.chdir(scratch)  # onto the new mount
    return mounted


def write_file(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


def unshare(libc: Libc, flags: int) -> list[str] | None:
    """unshare(flags), with a new PID namespace too where allowed: the extra mechanisms, None on failure."""
    if libc.ok("unshare", flags | CLONE_NEWPID):
        return ["pidns"]
    return [] if libc.ok("unshare", flags) else None


def user_namespace(libc: Libc) -> list[str] | None:
    """New user + network + mount (+ PID) namespaces, mapping the current ids to root inside."""
    uid, gid = os.geteuid(), os.getegid()
    gained = unshare(libc, CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)
    if gained is None:
        return None
    write_file("/proc/self/setgroups", "deny")
    mapped = write_file("/proc/self/uid_map", f"0 {uid} 1") and write_file("/proc/self/gid_map", f"0 {gid} 1")
    return gained if mapped else None


def world_readable(roots: list[str]) -> bool:
    """Can a user who is neither owner nor group member read the interpreter's library?"""
    for root in roots:
        path = root
        need = 0o005  # the root itself: read + search by others; its ancestors: search
        while True:
            try:
                if os.stat(path).st_mode & need != need:
                    return False
            except OSError:
                return False
            if path == "/":
                break
            path, need = os.path.dirname(path), 0o001
    return True


def drop_to(libc: Libc, uid: int, keep_read: bool) -> bool:
    """Become ``uid`` (groups too), optionally keeping CAP_DAC_READ_SEARCH; False if not possible."""
    try:
        if keep_read and not libc.ok("prctl", PR_SET_KEEPCAPS, 1, 0, 0, 0):
            return False
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError:
        return False
    if keep_read:
        libc.set_capabilities(1 << CAP_DAC_READ_SEARCH)
    libc.ok("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)  # lets it write its own /proc/self/uid_map
    return True


def isolate(libc: Libc, scratch: str, uid: int, scratch_mb: int, roots: list[str]) -> list[str]:
    """Apply what this machine allows (module docstring, step 3); returns the mechanisms in effect."""
    done: list[str] = []
    root = os.geteuid() == 0
    gained = unshare(libc, CLONE_NEWNET | CLONE_NEWNS) if root else None
    if gained is not None:
        done += ["netns", *gained]
        if private_tmpfs(libc, scratch, scratch_mb, uid if uid >= 0 else 0):
            done.append("tmpfs")
    keep_read = False
    if root and uid >= 0:
        keep_read = not world_readable(roots)
        if "tmpfs" not in done:
            os.chown(scratch, uid, uid)
        if drop_to(libc, uid, keep_read):
            done.append(f"uid={uid}" + ("+read" if keep_read else ""))
    # A new user namespace would drop the kept capability, and with it the library.
    gained = user_namespace(libc) if "netns" not in done and not keep_read else None
    if gained is not None:
        done += ["userns", *gained]
        if private_tmpfs(libc, scratch, scratch_mb, 0):
            done.append("tmpfs")
    return done


def die_with_parent(libc: Libc, parent: int | None) -> None:
    libc.ok("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # the parent died before the line above
        os._exit(PARENT_GONE_EXIT)


def enter_pid_namespace(libc: Libc) -> None:
    """Fork into the new PID namespace: the child (its pid 1) goes on to run the code, and when it
    ends the kernel kills every process left in the namespace, also one that left the process
    group. This process only waits, then ends the way the child did (its CPU time is counted in
    ours by wait4)."""
    pid = os.fork()
    if pid == 0:
        die_with_parent(libc, None)  # the parent is outside the namespace: getppid() is 0
        return
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 1)


# ---- the audit hook -------------------------------------------------------------------------------
def resolve(
    path: str,
    _getcwd: Callable[[], str] = posix.getcwd,
    _lstat: Callable[[str], os.stat_result] = posix.lstat,
    _readlink: Callable[[str], str] = posix.readlink,
    _error: type[Exception] = OSError,
) -> str:
    """Absolute path with symlinks and ``..`` resolved, from C functions only (os.path is patchable)."""
    todo = (path if path.startswith("/") else _getcwd() + "/" + path).split("/")[::-1]
    parts: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
        current = "/" + "/".join(parts)
        try:
            is_link = _lstat(current).st_mode & 0o170000 == 0o120000
        except _error:
            continue
        if is_link:
            hops += 1
            target = _readlink(current) if hops <= 40 else "/"
            if target.startswith("/"):
                parts.clear()
            else:
                parts.pop()
            todo.extend(target.split("/")[::-1])
    return "/" + "/".join(parts)


def path_checks(
    scratch: str, roots: tuple[str, ...], max_writes: int
) -> tuple[Callable[..., bool], Callable[[Any, Any], None]]:
    """``allowed(path, write, scratch_too=True)`` and ``check_open(path, flags)`` for the hook;
    like it, they look up no global or builtin name when called."""
    is_a, str_, int_, bytes_, fspath, resolve_ = isinstance, str, int, bytes, posix.fspath, resolve
    blocked, outside, write_flags, files, opens = SandboxBlocked, OUTSIDE, WRITE_FLAGS, READABLE_FILES, [0]
    inside_scratch, readable = scratch.rstrip("/") + "/", tuple(r.rstrip("/") + "/" for r in roots)

    def allowed(path: Any, write: bool, scratch_too: bool = True) -> bool:
        if is_a(path, int_):
            return True  # a file descriptor: already open
        try:
            name: Any = fspath("." if path is None else path)
        except TypeError:
            return False
        full = resolve_(name.decode("utf-8", "surrogateescape") if is_a(name, bytes_) else name)
        if scratch_too and ((full + "/").startswith(inside_scratch) or full == "/dev/null"):
            return True
        return not write and (full in files or (full + "/").startswith(readable))

    def check_open(path: Any, flags: Any) -> None:
        write = is_a(flags, int_) and flags & write_flags != 0
        if not allowed(path, write):
            raise blocked(outside + str_(path))
        if write and max_writes and not is_a(path, int_):
            opens[0] += 1
            if opens[0] > max_writes:
                raise blocked(f"too many files written (at most {max_writes})")

    return allowed, check_open


def make_hook(
    scratch: str, roots: tuple[str, ...], max_writes: int
) -> Callable[[str, tuple[Any, ...]], None]:
    """The audit hook (module docstring, step 4): raises SandboxBlocked for a refused event."""
    allowed, check_open = path_checks(scratch, roots, max_writes)
    blocked, is_a, str_, bytes_, id_ = SandboxBlocked, isinstance, str, bytes, id
    watched, processes, reads, writes = WATCHED, PROCESS_EVENTS, READ_PATH_EVENTS, WRITE_PATH_EVENTS
    network, native, process_why, outside = NETWORK, NATIVE, PROCESSES_WHY, OUTSIDE
    function_parts = FUNCTION_PARTS
    # private read-only copies: the module's dicts can be reached (and changed) through frames
    denied_imports = types.MappingProxyType(dict(DENIED_IMPORTS))
    other = types.MappingProxyType(dict(OTHER_EVENTS))
    protected = frozenset(id(f) for f in list(globals().values()) if isinstance(f, types.FunctionType))

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event.startswith("socket."):
            raise blocked(network)
        if event.startswith("ctypes."):
            raise blocked(native)
        if event not in watched:
            return
        if event == "open":
            check_open(args[0], args[2])
        elif event == "import":
            if args[0] in denied_imports:
                raise blocked(denied_imports[args[0]])
            if is_a(args[0], str_) and args[0].startswith(("_test", "ctypes.")):
                raise blocked(native)
            if args[1] is not None and not allowed(args[1], False, scratch_too=False):  # an extension's file
                raise blocked(native)
        elif event in processes:
            raise blocked(process_why)
        elif event in reads or event in writes:
            for arg in args:
                if is_a(arg, (str_, bytes_)) and not allowed(arg, event in writes):
                    raise blocked(outside + str_(arg))
        elif not event.startswith("object.__") or args[1] in function_parts and id_(args[0]) in protected:
            raise blocked(other[event])

    return hook


def read_roots() -> list[str]:
    found = [os.path.realpath(p) for p in [*sys.path, *EXTRA_READ_ROOTS] if os.path.isdir(p)]
    return sorted(set(found))


# ---- running the code -----------------------------------------------------------------------------
def blocked_reason(
    error: BaseException | None,
    _isinstance: Callable[[object, type], bool] = isinstance,
    _id: Callable[[object], int] = id,
    _reason: Callable[[BaseException], str] = BaseException.__str__,
) -> str | None:
    """The reason of the first SandboxBlocked in an exception's chain, if any (builtins bound:
    the code may have replaced them)."""
    seen: list[int] = []
    while error is not None and _id(error) not in seen:
        if _isinstance(error, SandboxBlocked):
            return _reason(error)
        seen.append(_id(error))
        error = error.__cause__ or error.__context__
    return None


def print_error(error: BaseException, code: str) -> None:
    """The traceback as Python would print it, with the code's lines and without this script's frames."""
    tb = error.__traceback__.tb_next if error.__traceback__ else None
    try:
        import linecache
        import traceback

        linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
        report = traceback.TracebackException(type(error), error, tb)
        todo: list[traceback.TracebackException | None] = [report]
        seen: set[int] = set()
        while todo:  # the chain of causes and contexts
            item = todo.pop()
            if item is not None and id(item) not in seen:
                seen.add(id(item))
                item.stack[:] = [frame for frame in item.stack if frame.filename != __file__]
                todo += [item.__cause__, item.__context__]
        sys.stderr.write("".join(report.format()))
    except BaseException:  # no memory left, or the user's code broke the traceback module
        sys.__excepthook__(type(error), error, tb)


def run(code: str, report: Callable[[str], None]) -> None:
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    sys.argv = ["<code>"]
    try:
        exec(compile(code, "<code>", "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as error:
        reason = blocked_reason(error)
        if reason is not None:
            report(f"blocked {reason}")
        elif type(error) is MemoryError:
            report("memory")
        print_error(error, code)
        raise SystemExit(1) from None


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with open(args["code"], encoding="utf-8") as f:
        code = f.read()
    report = make_reporter(int(args["status_fd"]))
    set_limits(float(args["cpu_s"]), int(args["memory_mb"]), int(args["scratch_mb"]))
    libc, roots, uid = Libc(), read_roots(), int(args["uid"])
    done: list[str] = []
    if args["namespaces"] == "1":
        done = isolate(libc, args["scratch"], uid, int(args["scratch_mb"]), roots)
    libc.ok("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    die_with_parent(libc, int(args["parent"]))
    if "pidns" in done:
        enter_pid_namespace(libc)
    if any(d.startswith("uid=") for d in done):  # one uid per call: the count is this call's own
        n = int(args["max_processes"])
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
    del libc
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # so that importing them again goes through the hook
    scratch = resolve(args["scratch"])
    sys.addaudithook(make_hook(scratch, tuple(roots), 0 if "tmpfs" in done else MAX_WRITE_OPENS))
    report("ready " + " ".join(done + ["audit"]))
    run(code, report)


if __name__ == "__main__":
    main(sys.argv[1:])
