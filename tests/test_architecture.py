"""The package's layout rules, read from its source with ``ast`` (nothing is imported).

Imports point down only (CLI/callbacks → training/realign/sweep → methods → subspace → io → core → config),
so the graph of every import of the package's own modules, top-level and inside functions, has no cycle;
modules stay small unless they hold one concept, and functions stay short.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lssf_lightning"
MAX_MODULE_LINES = 650
MAX_FUNCTION_LINES = 60

# Known exceptions, each owned by a change in progress. These lists must only shrink: remove an entry when
# its module is fixed, never add one.
KNOWN_UPWARD_EDGES: set[tuple[str, str]] = set()
LARGE_MODULES: set[str] = set()
LONG_FUNCTIONS: set[tuple[str, str]] = set()
LAZY_OWN_IMPORTS = {  # function-level imports of the package's own modules, each with its reason
    # cli.py: its runners import the heavy modules under _guarded, so a Ctrl-C while torch is still being
    # imported ends in one line and exit code 130 (tests/test_trust_cli.py).
    "cli.py",
    # commands.py: `fit` and `demo` import Lightning, which the other commands do not need.
    "commands.py",
}


@functools.cache
def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(n) for n in ast.walk(node))
    return hidden


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The package modules one import statement loads (``from pkg import submodule`` counts the
    submodule)."""

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    if isinstance(node, ast.Import):
        return {owner(a.name) for a in node.names if a.name.startswith("lssf_lightning")} - {""}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not source.startswith("lssf_lightning"):
        return set()
    found = set()
    for alias in node.names:
        full = f"{source}.{alias.name}"
        found.add(full if full in modules else owner(source))
    return found - {""}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hidden = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) not in hidden:
                graph[module] |= _imported(node, module, path.name == "__init__.py", modules) - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["lssf_lightning.cli"], "the graph reader found no imports at all"
    for source, target in KNOWN_UPWARD_EDGES:
        graph[source].discard(target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The floors, lowest first (the package's own ``__init__`` imports nothing at run time): a module imports
# only its own floor and the floors below.
FLOORS = [
    ("lssf_lightning.validation", "lssf_lightning.config"),
    ("lssf_lightning.core",),
    ("lssf_lightning.io",),
    ("lssf_lightning.metrics", "lssf_lightning.calibration"),
    ("lssf_lightning.subspace",),
    ("lssf_lightning.methods", "lssf_lightning.plots"),
    ("lssf_lightning.adapters", "lssf_lightning.distributed"),
    ("lssf_lightning.realign", "lssf_lightning.training", "lssf_lightning.sweep", "lssf_lightning.selection",
     "lssf_lightning.monitoring", "lssf_lightning.forms", "lssf_lightning.stability"),
    ("lssf_lightning.lightning", "lssf_lightning.integrations"),
    ("lssf_lightning.demo",),
    ("lssf_lightning.cli", "lssf_lightning.commands", "lssf_lightning.__main__", "lssf_lightning.__init__"),
]


def floor(module: str) -> int:
    module = "lssf_lightning.__init__" if module == "lssf_lightning" else module
    for index, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def test_imports_point_down():
    upward = [
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if floor(target) > floor(source) and (source, target) not in KNOWN_UPWARD_EDGES
    ]
    assert not upward, f"imports that point up a floor: {upward}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_known_exceptions_are_still_needed():
    graph = import_graph()
    stale = [edge for edge in KNOWN_UPWARD_EDGES if edge[1] not in graph.get(edge[0], ())]
    assert not stale, f"fixed, remove from KNOWN_UPWARD_EDGES: {stale}"


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_modules_are_small_unless_they_hold_one_concept():
    big = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        docstring = ast.get_docstring(ast.parse(source)) or ""
        exempt = "One concept:" in docstring or _relative(path) in LARGE_MODULES
        if lines > MAX_MODULE_LINES and not exempt:
            big.append(f"{_relative(path)} ({lines} lines)")
    assert not big, f"modules over {MAX_MODULE_LINES} lines without 'One concept:' in their docstring: {big}"


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring does not count
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def test_functions_are_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = _body_lines(node)
                if lines > MAX_FUNCTION_LINES and (_relative(path), node.name) not in LONG_FUNCTIONS:
                    long.append(f"{_relative(path)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"function bodies over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_package_imports_its_own_modules_at_the_top():
    """Lazy imports are for heavy third parties (transformers, peft, matplotlib), not for the graph."""
    lazy = []
    for path in PACKAGE.rglob("*.py"):
        if _relative(path) in LAZY_OWN_IMPORTS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if _imported(node, "lssf_lightning.x", False, _modules()):
                        lazy.append(f"{_relative(path)}:{node.lineno} {ast.unparse(node)}")
    assert not lazy, f"function-level imports of the package's own modules: {lazy}"


def test_the_code_runs_on_the_minimum_python_it_declares():
    """``requires-python`` is checked, not hoped for: vermin reads every module for newer syntax and stdlib
    names (``typing.Self`` is 3.11; ``typing_extensions.Self`` works on 3.10)."""
    pytest.importorskip("vermin", reason="vermin is a dev dependency: pip install -e '.[dev]'")
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    minimum = re.search(r'^requires-python = ">=([0-9.]+)"', pyproject, re.MULTILINE)[1]
    # --exclude long: vermin reads ``torch.long`` as Python 2's ``long``
    vermin = "import sys, vermin; sys.exit(vermin.main())"  # its console script, from this interpreter
    options = [f"-t={minimum}-", "--no-tips", "--violations", "--eval-annotations", "--exclude", "long"]
    command = [sys.executable, "-c", vermin, *options, str(PACKAGE)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"needs a newer Python than {minimum}:\n{done.stdout}{done.stderr}"
