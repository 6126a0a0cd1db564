"""The rules of docs/architecture.md ("Rules CI holds"), checked. `make test` runs this first.

    python scripts/check_rules.py            # all four checks
    python scripts/check_rules.py --no-mypy  # the three fast ones

1. imports   every import inside flowrl/ points down the layers below, and no two units
             (a subpackage or top-level module of flowrl) import each other in a cycle;
2. sizes     files <= 800 lines, driver modules <= 150, functions <= 80;
3. raw keys  no batch-key string (a value of flowrl.keys.Keys) as a subscript, dict key,
             ``in`` test or ``.get/.pop/.setdefault`` key outside keys.py and batch.py;
4. mypy      on the typed core (MYPY_PATHS), with the [tool.mypy] settings of pyproject.toml.

Each violation is one line, ``path:line: what is wrong; what to do``; the exit status is 1 if
there is any. Every check is a function of the repository root, so tests run them on a
made-up tree. Standard library only (and mypy for check 4).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "flowrl"
REPO = Path(__file__).resolve().parent.parent

# ---- 1. import direction -------------------------------------------------------------------
# Layers, top to bottom; a module may import from its own layer or a lower one. Keys are the
# units of flowrl: a subpackage or a top-level module ("__init__" is the package itself).
LAYERS: dict[str, tuple[int, str]] = {}
for _layer, _name, _units in [
    (5, "apps", ["cli", "quickstart", "demo", "export", "evaluation", "plot", "config_docs"]),
    (4, "drivers", ["drivers", "config"]),
    (3, "trainer", ["trainer", "planner"]),
    (2, "workers", ["workers"]),
    (1, "components", ["engines", "controller", "algos", "data", "rewards", "envs", "models", "tasks"]),
    (0, "base", ["batch", "keys", "plugins", "__init__"]),
]:
    LAYERS.update({unit: (_layer, _name) for unit in _units})
CLASSIFY = "classify it in scripts/check_rules.py (LAYERS)"

# ---- 2. sizes ------------------------------------------------------------------------------
MAX_FILE_LINES = 800
MAX_DRIVER_LINES = 150
MAX_FUNCTION_LINES = 80
# Modules of flowrl/drivers/ that are not one algorithm's program (or are the SFT/RM programs).
NOT_DRIVERS = {"__init__.py", "steps.py", "registry.py", "sft.py", "reward_model.py"}

# ---- 3. raw keys ---------------------------------------------------------------------------
RAW_KEYS_ALLOWED_IN = {"keys.py", "batch.py"}  # relative to flowrl/
KEY_METHODS = {"get", "pop", "setdefault"}
# Functions whose mappings are not a Batch but share a field name with one: a file format
# (dataset rows, evaluation records), a Hugging Face output or a metric. (path, function): why.
# An entry that no longer matches any literal is itself reported, so the list stays exact.
NOT_BATCH_KEYS: dict[tuple[str, str], str] = {
    ("flowrl/data/rows.py", "check_prompt_row"): "the dataset row format (parquet/JSONL)",
    ("flowrl/data/rows.py", "check_extra_info"): "the dataset row format (parquet/JSONL)",
    ("flowrl/data/dataset.py", "_item"): "the dataset row format (parquet/JSONL)",
    ("flowrl/data/dataset.py", "tokenize_texts"): "a Hugging Face tokenizer's output",
    ("flowrl/data/sft.py", "split_sft_row"): "the SFT row format",
    ("flowrl/rewards/registry.py", "call_verl_style"): "the keyword arguments of verl's compute_score",
    ("flowrl/rewards/registry.py", "call_trl_style"): "the keyword arguments of a TRL reward function",
    ("flowrl/tasks/arithmetic.py", "rl_row"): "the dataset row format it writes",
    ("flowrl/tasks/reasoning_gym.py", "make_rows"): "the dataset row format it writes",
    ("flowrl/tasks/gsm8k.py", "make_row"): "the dataset row format it writes",
    ("flowrl/tasks/tool_arithmetic.py", "rl_row"): "the dataset row format it writes",
    ("flowrl/envs/tool_env.py", "_score"): "the dataset row an environment is reset with",
    ("flowrl/workers/agent_loop.py", "dataset_rows"): "the dataset row an environment is reset with",
    ("flowrl/evaluation.py", "sample_records"): "the JSONL record format of evaluation samples",
    ("flowrl/algos/losses.py", "entropy_loss"): "the metric name 'entropy'",
    ("flowrl/planner/cost.py", "predict"): "the step's stage names (timing/<stage>)",
    ("flowrl/planner/cost.py", "stage_micro_batches"): "the step's stage names (timing/<stage>)",
    ("flowrl/planner/memory.py", "transient_bytes"): "the step's stage names (timing/<stage>)",
}

# ---- 4. mypy -------------------------------------------------------------------------------
MYPY_PATHS = ["flowrl/algos", "flowrl/batch.py", "flowrl/keys.py", "flowrl/controller"]


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the root
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. flowrl.algos.losses
    path: Path
    rel: str  # path relative to the root, for messages
    is_package: bool  # an __init__.py

    @property
    def unit(self) -> str:
        return unit_of(self.name)


def unit_of(module: str) -> str:
    """flowrl.algos.losses -> "algos"; flowrl.cli -> "cli"; flowrl -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def iter_modules(root: Path) -> Iterator[Module]:
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        yield Module(".".join(parts), path, path.relative_to(root).as_posix(), is_package)


def parse(module: Module) -> ast.Module:
    return ast.parse(module.path.read_text(), filename=str(module.path))


def imported_modules(module: Module, tree: ast.Module, known: set[str]) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, at any depth
    (functions and ``if TYPE_CHECKING:`` blocks included). ``from pkg import name`` counts as
    an import of ``pkg.name`` when that is a module of ``known``, else of ``pkg``."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in known else target), node.lineno


@dataclass(frozen=True)
class Edge:
    source: str  # unit
    target: str  # unit
    rel: str  # where the first such import is
    line: int


def check_imports(root: Path) -> list[Violation]:
    """Layer direction of every import inside flowrl/, and no import cycle between units."""
    modules = list(iter_modules(root))
    known = {m.name for m in modules}
    out: list[Violation] = []
    edges: dict[tuple[str, str], Edge] = {}
    for module in modules:
        if module.unit not in LAYERS:
            out.append(Violation(module.rel, 1, f"{module.name} is in no layer; {CLASSIFY}"))
            continue
        layer, layer_name = LAYERS[module.unit]
        for target, line in imported_modules(module, parse(module), known):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            unit = unit_of(target)
            if unit not in LAYERS:
                out.append(Violation(module.rel, line, f"imports {target}, which is in no layer; {CLASSIFY}"))
                continue
            t_layer, t_name = LAYERS[unit]
            if t_layer > layer:
                out.append(Violation(
                    module.rel, line,
                    f"{module.name} (layer {layer} {layer_name}) imports {target} "
                    f"(layer {t_layer} {t_name}); imports point down: "
                    f"move what it needs to layer {layer} or lower, or pass it in",
                ))
            if unit != module.unit:
                edges.setdefault((module.unit, unit), Edge(module.unit, unit, module.rel, line))
    out.extend(_cycle_violations(edges))
    return out


def _cycle_violations(edges: dict[tuple[str, str], Edge]) -> list[Violation]:
    graph: dict[str, list[str]] = {}
    for source, target in sorted(edges):
        graph.setdefault(source, []).append(target)
        graph.setdefault(target, [])
    out = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        cycle = _shortest_cycle(graph, min(component), set(component))
        path = " -> ".join(f"{PACKAGE}.{u}" for u in cycle)
        where = ", ".join(f"{e.rel}:{e.line}" for e in (edges[a, b] for a, b in zip(cycle, cycle[1:])))
        first = edges[cycle[0], cycle[1]]
        out.append(Violation(
            first.rel, first.line,
            f"import cycle {path} (imports at {where}); "
            "break it by moving the shared code into one unit or a lower layer",
        ))
    return out


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm (recursive; the graph has a few dozen nodes)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _shortest_cycle(graph: dict[str, list[str]], start: str, within: set[str]) -> list[str]:
    """[start, ..., start]: breadth-first from start back to itself inside one component."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in graph[node]:
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if nxt in within and nxt not in parent:
                    parent[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


# ---- 2. sizes ------------------------------------------------------------------------------
def check_sizes(root: Path) -> list[Violation]:
    out: list[Violation] = []
    for module in iter_modules(root):
        lines = len(module.path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            message = f"file has {lines} lines (max {MAX_FILE_LINES}); split it by job"
            out.append(Violation(module.rel, 1, message))
        in_drivers = module.path.parent == root / PACKAGE / "drivers"
        is_driver = in_drivers and module.path.name not in NOT_DRIVERS
        if is_driver and lines > MAX_DRIVER_LINES:
            out.append(Violation(
                module.rel, 1,
                f"driver has {lines} lines (max {MAX_DRIVER_LINES}); "
                "move shared steps to flowrl/drivers/steps.py or the math to flowrl/algos/",
            ))
        for node in ast.walk(parse(module)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1  # decorators not counted
                if n > MAX_FUNCTION_LINES:
                    out.append(Violation(
                        module.rel, node.lineno,
                        f"function {node.name}() has {n} lines (max {MAX_FUNCTION_LINES}); "
                        "split it into named steps",
                    ))
    return out


# ---- 3. raw keys ---------------------------------------------------------------------------
def batch_keys(root: Path) -> dict[str, str]:
    """{value: constant name} of the string constants of ``class Keys`` in flowrl/keys.py."""
    tree = ast.parse((root / PACKAGE / "keys.py").read_text())
    keys: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Keys":
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    for target in stmt.targets:
                        if isinstance(target, ast.Name):
                            keys[stmt.value.value] = target.id
    return keys


def _key_literals(node: ast.AST, function: str = "") -> Iterator[tuple[ast.expr, str, str]]:
    """(expression, how, enclosing function) of every expression used as a mapping key:
    ``x["k"]``, ``{"k": v}``, ``"k" in x``, ``x.get("k")`` (and ``.pop``, ``.setdefault``)."""
    if isinstance(node, ast.Subscript) and not _is_literal_type(node.value):
        yield node.slice, "a subscript", function
    elif isinstance(node, ast.Dict):
        yield from ((key, "a dict key", function) for key in node.keys if key is not None)
    elif isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In | ast.NotIn):
        yield node.left, "an 'in' test", function
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in KEY_METHODS and node.args:
            yield node.args[0], f"a .{node.func.attr}() key", function
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        function = node.name
    for child in ast.iter_child_nodes(node):
        yield from _key_literals(child, function)


def _is_literal_type(node: ast.expr) -> bool:
    """``Literal`` or ``typing.Literal``: its subscript is a type, not a mapping key."""
    return (isinstance(node, ast.Name) and node.id == "Literal") or (
        isinstance(node, ast.Attribute) and node.attr == "Literal"
    )


def check_raw_keys(root: Path, not_batch_keys: dict[tuple[str, str], str] | None = None) -> list[Violation]:
    """Batch-key strings used as mapping keys outside keys.py and batch.py."""
    allowed = NOT_BATCH_KEYS if not_batch_keys is None else not_batch_keys
    keys = batch_keys(root)
    used: set[tuple[str, str]] = set()
    out: list[Violation] = []
    for module in iter_modules(root):
        if module.path.relative_to(root / PACKAGE).as_posix() in RAW_KEYS_ALLOWED_IN:
            continue
        for node, how, function in _key_literals(parse(module)):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in keys):
                continue
            if (module.rel, function) in allowed:
                used.add((module.rel, function))
                continue
            out.append(Violation(
                module.rel, node.lineno,
                f'raw batch key "{node.value}" as {how}; use Keys.{keys[node.value]} (from flowrl.keys), '
                "or, if this mapping is not a Batch, list the function in NOT_BATCH_KEYS "
                "(scripts/check_rules.py)",
            ))
    for path, function in sorted(set(allowed) - used):
        out.append(Violation(
            "scripts/check_rules.py", 1,
            f"NOT_BATCH_KEYS entry ({path}, {function}) matches no key literal; remove it",
        ))
    return out


# ---- 4. mypy -------------------------------------------------------------------------------
def check_mypy(root: Path) -> list[Violation]:
    if importlib.util.find_spec("mypy") is None:
        return [Violation("pyproject.toml", 1, "mypy is not installed; pip install -e '.[test]'")]
    paths = [p for p in MYPY_PATHS if (root / p).exists()]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty", *paths],
        cwd=root, capture_output=True, text=True,
    )
    if proc.returncode == 0:
        return []
    out = []
    for line in proc.stdout.splitlines():
        m = re.match(r"(.+?):(\d+): error: (.*)", line)
        if m:
            out.append(Violation(m[1], int(m[2]), f"mypy: {m[3]}"))
    if not out:  # mypy failed without a parsable error line (a config or crash)
        said = (proc.stdout + proc.stderr).strip()
        out.append(Violation("pyproject.toml", 1, f"mypy exited {proc.returncode}: {said}"))
    return out


CHECKS = {"imports": check_imports, "sizes": check_sizes, "raw keys": check_raw_keys, "mypy": check_mypy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=REPO, help="repository root (default: this checkout)")
    parser.add_argument("--no-mypy", action="store_true", help="skip check 4 (the slow one)")
    args = parser.parse_args(argv)
    failed = 0
    for name, check in CHECKS.items():
        if name == "mypy" and args.no_mypy:
            continue
        violations = sorted(check(args.root), key=lambda v: (v.path, v.line))
        for v in violations:
            print(v)
        print(f"[check_rules] {name}: {f'{len(violations)} violation(s)' if violations else 'ok'}")
        failed += len(violations)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
