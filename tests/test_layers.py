"""The package's floors (DESIGN.md): a module imports only its own floor or lower ones, imports inside functions
included, and no two modules import each other, directly or around a circle.

Read from the source with ``ast`` (nothing is imported), so a violation names the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "svdquant"

# Low to high. The longest matching prefix decides a module's floor; keep in step with DESIGN.md's table.
FLOORS = {
    "svdquant._env": 0, "svdquant._checks": 0, "svdquant._progress": 0, "svdquant._memory": 0,
    "svdquant._timing": 0, "svdquant._cpu": 0, "svdquant._tiny_facts": 0, "svdquant._version": 0,
    "svdquant._state": 0, "svdquant.formats": 0, "svdquant.recipes": 0, "svdquant.images": 0,
    "svdquant.metrics": 0, "svdquant.quality": 0, "svdquant.integrations.diffusers.compat": 0,
    "svdquant.kernels": 1,
    "svdquant.ops": 2,
    "svdquant.algorithm": 3,
    "svdquant.modules": 4,
    "svdquant.models": 5,
    "svdquant.calibration": 6,
    "svdquant.quantize": 7,
    "svdquant.checkpoint": 8, "svdquant.convert": 8, "svdquant.lora": 8, "svdquant.model_card": 8,
    "svdquant.pipelines": 9, "svdquant.integrations": 9,
    "svdquant.serve": 10, "svdquant.cli": 10, "svdquant.hub": 10, "svdquant": 10,
}
NAMES = {0: "foundation", 1: "kernels", 2: "ops", 3: "algorithm", 4: "modules", 5: "models", 6: "calibration",
         7: "quantize", 8: "checkpoints", 9: "pipelines and integrations", 10: "serve, CLI and the package root"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def floor(module: str) -> int:
    best = max((k for k in FLOORS if module == k or module.startswith(k + ".")), key=len)
    return FLOORS[best]


def _resolve(importer: str, node: ast.ImportFrom) -> list[str]:
    """The svdquant modules an import statement loads (a name imported from a package may be a submodule)."""
    if node.level:
        base = importer.split(".")
        if MODULES[importer].name != "__init__.py":
            base.pop()  # a plain module's relative imports start from its package
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    if not (mod == "svdquant" or mod.startswith("svdquant.")):
        return []
    subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
    # ``from .. import kernels`` loads the submodule; the package itself counts only for names defined in it
    return subs if len(subs) == len(node.names) else [mod, *subs]


def imports() -> dict[str, list[tuple[str, int]]]:
    """Module -> [(imported svdquant module, line)], every import statement (inside functions too)."""
    graph: dict[str, list[tuple[str, int]]] = {}
    for name, path in MODULES.items():
        edges = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                edges += [(m, node.lineno) for m in _resolve(name, node)]
            elif isinstance(node, ast.Import):
                edges += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "svdquant"]
        graph[name] = [(m, line) for m, line in edges if m in MODULES and m != name]
    return graph


def test_every_module_has_a_floor():
    assert "svdquant" in FLOORS and all(floor(m) in NAMES for m in MODULES)


def test_no_module_imports_a_higher_floor():
    bad = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} ({NAMES[floor(m)]}) imports {dep} ({NAMES[floor(dep)]})"
           for m, edges in imports().items() for dep, line in edges
           # a package's __init__ re-exporting its own submodules is the package's face, not an upward import
           if floor(dep) > floor(m)]
    assert not bad, "imports against the floors (DESIGN.md):\n" + "\n".join(bad)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _graph_without_package_faces() -> dict[str, list[str]]:
    """The import graph, where a submodule's import of its own package's ``__init__`` (``from . import x`` reads
    the package) does not count as a circle with the ``__init__`` that re-exports it."""
    graph = {}
    for m, edges in imports().items():
        graph[m] = sorted({d for d, _ in edges if not (m.startswith(d + ".") and MODULES[d].name == "__init__.py")})
    return graph


def test_no_import_cycles():
    cycles = _cycles(_graph_without_package_faces())
    assert not cycles, "modules that import each other (around a circle):\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("case, expected", [
    ("svdquant.ops.runners", 2), ("svdquant.kernels", 1), ("svdquant", 10), ("svdquant.quantize", 7),
    ("svdquant.integrations.diffusers.compat", 0), ("svdquant.quality.metrics", 0),
])
def test_floor_lookup(case, expected):
    assert floor(case) == expected


# The size rules of DESIGN.md: a module reads in one sitting, a function fits a screen or two. The CLI's parser is
# one long declarative table and stays whole.
MODULE_LINES, FUNCTION_LINES = 450, 80
SIZE_EXEMPT = {"svdquant.cli.parser"}


def test_modules_stay_small():
    big = [f"{path.relative_to(ROOT.parent)}: {n} lines" for m, path in MODULES.items()
           if m not in SIZE_EXEMPT and (n := len(path.read_text().splitlines())) > MODULE_LINES]
    assert not big, f"modules over {MODULE_LINES} lines (split them by job):\n" + "\n".join(big)


def test_functions_stay_short():
    long = []
    for m, path in MODULES.items():
        if m in SIZE_EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {FUNCTION_LINES} lines:\n" + "\n".join(long)
