"""The code sandbox and the tools: real child processes, no mocks.

Every sandbox test runs twice: with the OS isolation this machine allows (namespaces, a uid of
its own, a private tmpfs) and with none of it (``OS_ISOLATION = False``: rlimits, the process
group and the audit hook only, what a CI container gets), since the limits must hold in both.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flowrl.envs import sandbox
from flowrl.envs.sandbox import SandboxLimits, SandboxResult, run_python
from flowrl.envs.tools import STOP_STRINGS, TOOLS, Calculator, PythonTool, make_tool, parse_tool_call

FAST = SandboxLimits(wall_s=3.0, cpu_s=1.0)


@pytest.fixture(params=[True, False], ids=["os-isolation", "audit-only"])
def isolation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(sandbox, "OS_ISOLATION", request.param)
    return bool(request.param)


def scratch_of(result: SandboxResult) -> str:
    """The scratch directory, which the test programs print on their first line."""
    path = result.stdout.splitlines()[0]
    assert path.startswith("/") and "flowrl-sandbox-" in path, result
    return path


def processes_mentioning(marker: str) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(name))
    return found


# ---- run_python ---------------------------------------------------------------------------------
def test_prints_output_and_reads_stdin(isolation: bool) -> None:
    code = "import math, json, itertools, fractions\nprint(math.factorial(20), input()[::-1])"
    result = run_python(code, stdin="abc\n")
    assert result.ok and result.status == "ok", result
    assert result.stdout == "2432902008176640000 cba\n"
    assert result.observation() == "2432902008176640000 cba"
    assert result.isolation[-1:] == ("audit",) and (isolation or result.isolation == ("audit",))


def test_exception_is_an_error_with_the_traceback(isolation: bool) -> None:
    result = run_python("print('before')\nx = {}\nx['missing']")
    assert not result.ok and result.status == "error"
    observation = result.observation()
    assert observation.startswith("before\n")
    assert "KeyError: 'missing'" in observation.splitlines()[-2]  # the traceback's last line
    assert observation.endswith("[exit code 1]")
    assert "sandbox_child" not in observation  # the bootstrap's frames are hidden
    assert run_python("import sys; sys.exit(3)").detail == "exit code 3"


def test_infinite_loop_is_stopped(isolation: bool) -> None:
    result = run_python("while True: pass", FAST)
    assert result.status in ("cpu_limit", "timeout"), result
    assert result.seconds < FAST.wall_s + 2
    assert result.observation() in ("[cpu limit 1 s exceeded]", "[timeout after 3 s]")


def test_sleep_times_out(isolation: bool) -> None:
    limits = SandboxLimits(wall_s=1.0)
    result = run_python("import time\nprint('started')\ntime.sleep(100)", limits)
    assert result.status == "timeout", result
    assert result.seconds < limits.wall_s + 2
    assert result.observation() == "started\n[timeout after 1 s]"  # output before the kill is kept


def test_memory_limit(isolation: bool) -> None:
    result = run_python("b = bytearray(2 * 1024**3)\nprint('allocated')")
    assert result.status == "memory_limit", result
    assert "allocated" not in result.stdout
    assert result.observation().endswith("[memory limit 256 MB exceeded]")


@pytest.mark.parametrize(
    "code",
    ["import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", "import socket\nsocket.socket()"],
)
def test_network_is_blocked(isolation: bool, code: str) -> None:
    result = run_python(code)
    assert result.status == "blocked", result
    assert result.observation().endswith("[blocked: network access is not allowed]")


def test_files_outside_the_scratch_directory_are_blocked(isolation: bool, tmp_path: Path) -> None:
    result = run_python("print(open('/etc/passwd').read())")
    assert result.status == "blocked" and "root:" not in result.stdout
    assert "file access outside the scratch directory" in result.detail
    outside = tmp_path / "written"
    result = run_python(f"open({str(outside)!r}, 'w').write('x')")
    assert result.status == "blocked" and not outside.exists()
    # via a relative path out of the scratch directory and via os functions
    assert run_python("open('../../etc/passwd').read()").status == "blocked"
    assert run_python("import os; os.listdir('/')").status == "blocked"
    assert run_python("import os; os.symlink('/etc/passwd', 'p')").status == "blocked"


def test_refusal_caught_by_the_code_is_not_an_error(isolation: bool) -> None:
    code = "try:\n    open('/etc/passwd')\nexcept PermissionError as e:\n    print('refused:', e)"
    result = run_python(code)
    assert result.ok and result.stdout.startswith("refused: file access outside"), result


def test_scratch_directory_is_private_and_deleted(isolation: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWRL_TEST_SECRET", "hunter2")
    code = (
        "import os, tempfile\nprint(os.getcwd())\n"
        "open('out.txt', 'w').write('data')\nos.mkdir('sub')\n"
        "with tempfile.TemporaryDirectory() as d: print(d.startswith(os.getcwd()))\n"
        "print(sorted(os.listdir('.')), open('out.txt').read(), 'FLOWRL_TEST_SECRET' in os.environ)"
    )
    result = run_python(code)
    assert result.ok, result
    assert result.stdout.splitlines()[1:] == ["True", "['out.txt', 'sub'] data False"]
    assert not os.path.exists(scratch_of(result))


def test_fork_bomb_leaves_no_process(isolation: bool) -> None:
    result = run_python("import os\nprint(os.getcwd())\nwhile True:\n    os.fork()", FAST)
    assert result.status in ("blocked", "cpu_limit", "timeout", "error"), result
    assert result.seconds < FAST.wall_s + 2
    time.sleep(0.1)
    assert processes_mentioning(scratch_of(result)) == []


@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\nsubprocess.run(['ls'])",
        "import os\nos.system('ls')",
        "import os\nos.kill(1, 9)",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    ],
)
def test_processes_are_blocked(isolation: bool, code: str) -> None:
    result = run_python(code)
    assert result.status == "blocked", result
    assert result.detail == "blocked: creating or signalling processes is not allowed"


@pytest.mark.parametrize(
    "code",
    [
        "import ctypes\nctypes.CDLL(None).getpid()",
        "import ctypes.util",
        "import gc\ngc.get_objects()",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
        # an extension module of its own, from the scratch directory
        "open('m.cpython-311-x86_64-linux-gnu.so', 'wb').write(b'ELF')\n"
        "import sys\nsys.path[:0] = ['.']\nimport m",
        # the hook's helpers and tables, reached through the bootstrap's frame
        "import sys\nsys._getframe(1).f_globals['resolve'].__defaults__ = (lambda: '/',)",
        "import sys\nsys._getframe(1).f_globals['DENIED_IMPORTS'].clear()\nimport _posixsubprocess",
        "import builtins\nbuiltins.isinstance = lambda *a: True\nbuiltins.str = bytes\nopen('/etc/passwd')",
    ],
)
def test_native_code_and_tampering_are_blocked(isolation: bool, code: str) -> None:
    result = run_python(code)
    assert result.status == "blocked", result


def test_huge_output_is_truncated_promptly(isolation: bool) -> None:
    start = time.monotonic()
    code = "print('x' * 10**7)\nimport sys\nsys.stderr.write('e' * 10**6 + 'END')\nraise SystemExit(2)"
    result = run_python(code)
    assert time.monotonic() - start < 3
    assert result.status == "error"
    assert result.stdout == "x" * 2000 and result.stdout_cut == 10**7 + 1 - 2000
    assert len(result.stderr) == 2000 and result.stderr.endswith("END")  # the tail of stderr
    assert "more bytes of output]" in result.observation()


def test_concurrent_calls(isolation: bool) -> None:
    code = "import os, sys\nprint(int(sys.stdin.read()) ** 2, os.getcwd())"
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: run_python(code, stdin=str(i)), range(16)))
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    assert [int(r.stdout.split()[0]) for r in results] == [i * i for i in range(16)]
    assert len({r.stdout.split()[1] for r in results}) == 16  # a scratch directory each


def test_os_layers_hold_without_the_audit_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What holds when code gets past the audit hook (here: a child without it), on machines that
    allow namespaces or a uid of its own."""
    source = sandbox.CHILD.read_text()
    hook = next(line for line in source.splitlines() if "sys.addaudithook(" in line)
    unhooked = tmp_path / "child_without_hook.py"
    unhooked.write_text(source.replace(hook, "    pass"))
    monkeypatch.setattr(sandbox, "CHILD", unhooked)
    isolation = run_python("pass").isolation
    if not {"netns", "userns"} & set(isolation):
        pytest.skip(f"this machine allows no namespaces ({isolation})")
    own_uid = any(m.startswith("uid=") for m in isolation)
    network = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
    network += "except OSError as e:\n    print(e)"
    assert "unreachable" in run_python(network).stdout
    if "pidns" in isolation or own_uid:  # else nothing finds a process that left the group
        escape = "import os, time\nprint(os.getcwd(), flush=True)\n"
        escape += "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)"
        result = run_python(escape)
        assert result.ok, result
        assert processes_mentioning(scratch_of(result)) == []  # killed although it left the process group
    if own_uid:  # RLIMIT_NPROC holds
        bomb = "import os\nprint(os.getcwd(), flush=True)\n"
        bomb += "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        result = run_python(bomb, FAST)
        assert result.status in ("timeout", "cpu_limit") and result.seconds < FAST.wall_s + 2
        assert processes_mentioning(scratch_of(result)) == []


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="SandboxLimits.wall_s=0"):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError, match="SandboxLimits.memory_mb=1.5"):
        SandboxLimits(memory_mb=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SandboxLimits.memory_mb=16 is below"):
        SandboxLimits(memory_mb=16)


# ---- tools --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("123456789*987654321", "121932631112635269"),
        ("2**100", "1267650600228229401496703205376"),
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("-2**2", "-4"),
        ("7 / 2", "3.5"),
        ("2 / 3 * 3", "2"),
        ("0.1 + 0.2", "0.3"),
        ("17 // 5", "3"),
        ("17 % 5", "2"),
        ("2 ** -2", "0.25"),
        ("2 ** 0.5", "1.4142135623730951"),
    ],
)
def test_calculator_is_exact(expression: str, expected: str) -> None:
    output = Calculator()(expression)
    assert output.ok and output.status == "ok"
    assert output.text == expected


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("__import__('os')", "calculator: unsupported syntax 'Call'"),
        ("os.system", "calculator: unsupported syntax 'Attribute'"),
        ("x + 1", "calculator: unsupported syntax 'Name'"),
        ("1 < 2", "calculator: unsupported syntax 'Compare'"),
        ("'a' * 3", "calculator: unsupported value 'a'"),
        ("1 / 0", "calculator: division by zero"),
        ("1 +", "calculator: invalid expression: invalid syntax"),
        ("9**9**9", "calculator: result has more than 1000 digits"),
        ("10**600 * 10**600", "calculator: result has more than 1000 digits"),
    ],
)
def test_calculator_refuses(expression: str, error: str) -> None:
    start = time.monotonic()
    output = Calculator()(expression)
    assert time.monotonic() - start < 0.5
    assert not output.ok and output.status == "error"
    assert output.text == error


def test_python_tool() -> None:
    tool = make_tool("python", limits=FAST)
    assert isinstance(tool, PythonTool) and tool.limits == FAST
    output = tool("\n```python\nfor i in range(3):\n    print(i)\n```\n")
    assert output.ok and output.text == "0\n1\n2"
    assert tool("x = 1").text == "(no output)"
    failed = tool("import socket; socket.socket()")
    assert not failed.ok and failed.status == "blocked"
    assert failed.text.endswith("[blocked: network access is not allowed]")


def test_registry_and_parsing() -> None:
    assert set(TOOLS) == {"calculator", "python"} and STOP_STRINGS == ("</calculator>", "</python>")
    with pytest.raises(ValueError, match="unknown tool 'shell': known tools are calculator, python"):
        make_tool("shell")
    text = "First <calculator>12*34</calculator>, then <python>print(1)</python>"
    assert parse_tool_call(text) == ("calculator", "12*34")
    assert parse_tool_call("<python>\nprint(1)\n</python> done") == ("python", "\nprint(1)\n")
    assert parse_tool_call("Let me check. <python>print(2)") == ("python", "print(2)")  # stopped at the tag
    assert parse_tool_call("no tool here, 3 < 4 > 2") is None
    assert parse_tool_call("<shell>ls</shell>") is None
