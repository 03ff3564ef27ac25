"""The package's import graph, read with `ast`: no cycle of any length, and a command line that starts light.

The graph has one node per module under src/chextrain (a package is its __init__) and an edge for
every import a module can execute: at module level, inside functions and classes, under
`if TYPE_CHECKING`, and `importlib.import_module("...")` with a literal name. Relative imports are
resolved. `import a.b.c` executes a, a.b and a.b.c, so it is an edge to each of them that is a
module of the package, except the importer's own ancestor packages, which are already being
imported when the importer runs (`from chextrain.cli import print_error` in cli/data.py is not a
cycle through cli/__init__.py). `from a.b import c` also reaches a.b.c when that is a module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "chextrain"
# Third-party libraries a command module must not import when it is imported (`chextrain --help`
# would pay for them): each command imports what it needs inside itself.
HEAVY = frozenset(
    {
        "torch",
        "torchvision",
        "lightning",
        "pytorch_lightning",
        "pandas",
        "pyarrow",
        "sklearn",
        "scipy",
        "matplotlib",
        "captum",
        "fastapi",
        "starlette",
        "uvicorn",
        "onnx",
        "onnxruntime",
        "safetensors",
        "numpy",
        "PIL",
        "pydicom",
        "tensorboard",
    }
)


@dataclass(frozen=True)
class Import:
    """One imported module name (absolute), where, and whether it runs when the importer is imported."""

    target: str
    alias: str | None  # `from target import alias`
    line: int
    module_level: bool  # outside any function body and outside `if TYPE_CHECKING`


def find_modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `src`."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


class _Collector(ast.NodeVisitor):
    """Imports of one module; `depth` counts enclosing function bodies and TYPE_CHECKING blocks."""

    def __init__(self, name: str, is_package: bool) -> None:
        self.package = name if is_package else name.rpartition(".")[0]
        self.found: list[Import] = []
        self.depth = 0

    def _add(self, target: str, alias: str | None, node: ast.AST) -> None:
        self.found.append(Import(target, alias, node.lineno, self.depth == 0))

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._nested(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._nested(node)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self.depth += 1
            for child in node.body:
                self.visit(child)
            self.depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, None, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            self._add(target, alias.name, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self._add(node.args[0].value, None, node)
        self.generic_visit(node)


def imports_of(name: str, path: Path) -> list[Import]:
    """Every import statement (and literal import_module call) of module `name` at `path`."""
    collector = _Collector(name, is_package=path.name == "__init__.py")
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return collector.found


def reached(imp: Import, importer: str, modules: Iterable[str]) -> list[str]:
    """Modules of the package that `imp` executes, less the importer and its ancestor packages."""
    known = set(modules)
    parts = imp.target.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    if imp.alias:
        names.append(f"{imp.target}.{imp.alias}")
    skip = {importer} | {importer.rsplit(".", k)[0] for k in range(1, importer.count(".") + 1)}
    return [n for n in dict.fromkeys(names) if n in known and n not in skip]


def import_graph(src: Path, package: str) -> dict[str, dict[str, int]]:
    """importer -> {imported module: first line} over every import (all levels)."""
    modules = find_modules(src, package)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        for imp in imports_of(name, path):
            for target in reached(imp, name, modules):
                graph[name].setdefault(target, imp.line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a closed path a -> ... -> a) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, set(c), c[0]) for c in sorted(components)]


def _cycle_in(graph: dict[str, dict[str, int]], members: set[str], start: str) -> list[str]:
    """The shortest closed path start -> ... -> start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members or w in previous:
                    continue
                previous[w] = v
                if w == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(previous[path[-1]])
                    return path[::-1]
                nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(members)}")


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """`a (line 3) -> b (line 9) -> a`: each arrow at the line of its import."""
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([*steps, cycle[-1]])


def heavy_at_import(name: str, src: Path, package: str) -> list[list[str]]:
    """Chains `name -> ... -> library` through module-level imports that end in a HEAVY library."""
    modules = find_modules(src, package)
    chains: list[list[str]] = []
    seen: set[str] = set()

    def walk(module: str, chain: list[str]) -> None:
        if module in seen:
            return
        seen.add(module)
        for imp in imports_of(module, modules[module]):
            if not imp.module_level:
                continue
            if imp.target.split(".")[0] in HEAVY:
                chains.append([*chain, imp.target])
            for target in reached(imp, module, modules):
                walk(target, [*chain, target])

    walk(name, [name])
    return chains


# ---------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cycles_of_any_length_are_found_through_functions_and_relative_imports(tmp_path: Path) -> None:
    src = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import pkg.b\n",
            "pkg/b.py": "def f():\n    from pkg.sub import c\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from .. import d\n",
            "pkg/d.py": "import importlib\nimportlib.import_module('pkg.a')\n",
            "pkg/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import f\n",
            "pkg/f.py": "from . import e\n",
            "pkg/ok.py": "import pkg.a\n",
        },
    )
    graph = import_graph(src, "pkg")
    assert graph["pkg.sub.c"] == {"pkg.d": 1}  # relative import resolved; pkg/__init__ is an ancestor
    assert graph["pkg.b"] == {"pkg.sub": 2, "pkg.sub.c": 2}  # a package import runs its __init__
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.d", "pkg.a"], ["pkg.e", "pkg.f", "pkg.e"]]
    assert describe(cycles[1], graph) == "pkg.e (line 3) -> pkg.f (line 1) -> pkg.e"


def test_importing_an_ancestor_package_is_no_cycle(tmp_path: Path) -> None:
    src = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/cli/__init__.py": "from pkg.cli import data\ndef err(): pass\n",
            "pkg/cli/data.py": "from pkg.cli import err\n",
            "pkg/x.py": "import pkg.cli.data\n",
        },
    )
    graph = import_graph(src, "pkg")
    assert graph["pkg.cli.data"] == {} and graph["pkg.x"] == {"pkg.cli": 1, "pkg.cli.data": 1}
    assert find_cycles(graph) == []


def test_heavy_imports_are_followed_through_module_level_imports_only(tmp_path: Path) -> None:
    src = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/cmd.py": "import typer\nfrom pkg import labels\ndef run():\n    import torch\n",
            "pkg/labels.py": "import pandas as pd\n",
            "pkg/light.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
        },
    )
    assert heavy_at_import("pkg.cmd", src, "pkg") == [["pkg.cmd", "pkg.labels", "pandas"]]
    assert heavy_at_import("pkg.light", src, "pkg") == []


# ---------------------------------------------------------------- the package


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(SRC, PACKAGE)
    assert len(graph) > 50 and "chextrain.cli.use" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, graph) for c in cycles)


def test_command_modules_import_no_heavy_library_when_imported() -> None:
    cli = f"{PACKAGE}.cli"
    commands = [m for m in find_modules(SRC, PACKAGE) if m == cli or m.startswith(f"{cli}.")]
    assert f"{PACKAGE}.cli.use" in commands
    chains = [chain for m in commands for chain in heavy_at_import(m, SRC, PACKAGE)]
    assert not chains, "heavy imports when the CLI is imported:\n" + "\n".join(" -> ".join(c) for c in chains)


def test_building_the_app_imports_no_heavy_library() -> None:
    """What the static check says, seen in a fresh interpreter: the app, every command registered."""
    code = (
        "import json, sys; from chextrain.cli import build_app; build_app(); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = {m.split(".")[0] for m in json.loads(done.stdout)}
    assert "typer" in loaded and sorted(loaded & HEAVY) == []
