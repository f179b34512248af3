"""No import cycle among the modules of trojanlab, imports inside functions included.

Imports flow down the pipeline (data -> models -> attacks -> detection -> defenses -> evaluation -> reproduce -> cli);
a function-level import that points back up hides a cycle that only shows when that function runs, so every
``import`` and ``from ... import`` anywhere in a module counts. The graph is read from the source with :mod:`ast`
(nothing is imported), so the test needs nothing outside this file.

A package's ``__init__`` re-exporting its own submodules while one of them imports the package is not a design
cycle: cycles made only of a package and modules inside it are let through (as ``tools/import_cycles.py`` does).
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import trojanlab

PACKAGE = "trojanlab"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # "path:line: statement"


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every ``.py`` file under ``root``."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def import_graph(root: Path, package: str) -> dict[str, list[Edge]]:
    """Each module's imports of other modules of ``package``, top-level and inside functions alike.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module and to ``a.b`` in any case; a name that is
    no module resolves to the nearest enclosing one. Relative imports are resolved against the module's package.
    """
    mods = _modules(root, package)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, list[Edge]] = {m: [] for m in mods}
    for module, (path, is_pkg) in mods.items():
        here = module.split(".") if is_pkg else module.split(".")[:-1]
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    if node.level > len(here):
                        raise AssertionError(f"{path}:{node.lineno}: relative import goes above the package")
                    stem = ".".join(here[: len(here) - node.level + 1])
                    base = f"{stem}.{node.module}" if node.module else stem
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            where = f"{path.relative_to(root.parent)}:{node.lineno}: {ast.get_source_segment(source, node)}"
            seen = set()
            for target in targets:
                resolved = resolve(target)
                if resolved and resolved != module and resolved not in seen:
                    seen.add(resolved)
                    graph[module].append(Edge(module, resolved, where))
    return graph


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's components with more than one module (iterative, so deep graphs do not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            for edge in edges:
                w = edge.target
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))
    return comps


def _inside_one_package(comp: list[str]) -> bool:
    return any(all(m == p or m.startswith(p + ".") for m in comp) for p in comp)


def shortest_cycle(graph: dict[str, list[Edge]], comp: list[str]) -> list[Edge]:
    """One shortest cycle through the first module of ``comp`` (breadth-first, within the component)."""
    members, start = set(comp), comp[0]
    came_by: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for edge in graph[v]:
            if edge.target not in members:
                continue
            if edge.target == start:
                path = [edge]
                while path[0].source != start:
                    path.insert(0, came_by[path[0].source])
                return path
            if edge.target not in came_by:
                came_by[edge.target] = edge
                queue.append(edge.target)
    raise AssertionError(f"no cycle through {start} in {comp}")  # pragma: no cover - a component has one


def describe(graph: dict[str, list[Edge]], comp: list[str]) -> str:
    cycle = shortest_cycle(graph, comp)
    lines = [f"import cycle: {' -> '.join([e.source for e in cycle] + [cycle[0].source])}"]
    lines += [f"    {e.source} -> {e.target}   ({e.where})" for e in cycle]
    if len(comp) > len(cycle):
        lines.append(f"    (all modules on a cycle with these: {', '.join(comp)})")
    return "\n".join(lines)


def import_cycles(root: Path, package: str) -> list[str]:
    graph = import_graph(root, package)
    return [describe(graph, comp) for comp in strongly_connected(graph) if not _inside_one_package(comp)]


def test_no_import_cycle_in_trojanlab():
    root = Path(trojanlab.__file__).parent
    cycles = import_cycles(root, PACKAGE)
    report = "\n".join(cycles)
    print(report)
    assert not cycles, f"{len(cycles)} import cycle(s) in {PACKAGE} (function-level imports count):\n{report}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("from .base import thing\n")
    (pkg / "low" / "base.py").write_text("thing = 1\n\ndef late():\n    from ..high import user\n    return user\n")
    (pkg / "low" / "other.py").write_text("from . import base\nfrom toy.low import base as again\n")
    (pkg / "high.py").write_text("from .low.base import thing\n\nuser = thing\n")
    graph = import_graph(pkg, "toy")
    assert {e.target for e in graph["toy.low.base"]} == {"toy.high"}
    assert {e.target for e in graph["toy.low.other"]} == {"toy.low", "toy.low.base"}
    cycles = import_cycles(pkg, "toy")
    assert len(cycles) == 1
    assert cycles[0].startswith("import cycle: toy.high -> toy.low.base -> toy.high")
    assert "toy/low/base.py:4: from ..high import user" in cycles[0]
    # a package and its own submodules importing each other is no cycle between layers
    (pkg / "low" / "base.py").write_text("thing = 1\n\ndef late():\n    from . import other\n    return other\n")
    (pkg / "low" / "other.py").write_text("from toy.low import thing\n")
    (pkg / "low" / "__init__.py").write_text("from .base import thing\nfrom .other import *\n")
    assert import_cycles(pkg, "toy") == []
