"""The import graph of deadrelu_cli keeps the layering docs/architecture.md describes.

Every module is parsed with `ast` (nothing is imported), imports inside functions included: a lazy
import is still a dependency. Each failure names the offending file and edge.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "deadrelu_cli"

# Bottom to top; a module imports only from its own layer or the layers below it. Entries are module
# names relative to the package; a name ending in "." covers every module under that package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "version", "files", "display", "memory", "stats", "config", "native")),
    ("report", ("report.", "gate")),
    (
        "readers",
        (
            "loaders.",
            "calibration",
            "text",
            "inputs",
            "intervals",
            "options",
            "wiring.",
            "probe.",
            "fixes.plan",
        ),
    ),
    ("backends", ("backends.", "causes", "sites", "fixes")),
    ("orchestration", ("engine", "distributed", "trend", "watcher", "integrations.", "fixes.run", "")),
    ("cli", ("cli.", "__main__")),
]
# These layers stay light: no framework import, not even inside a function.
FRAMEWORKS = ("torch", "onnx", "onnxruntime")
FRAMEWORK_FREE = ("foundation", "report")
CLI_ONLY = ("typer", "click")  # the command line's libraries stay in the cli layer


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, relative to the package ("" = the package itself)
    target: str  # imported module (relative), or "EXTERNAL:<top-level name>"
    names: tuple[str, ...]  # names taken with `from target import ...` (empty for `import target`)
    line: int

    def where(self) -> str:
        return f"{module_path(self.source)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str) -> str:
    return MODULE_PATHS[name]


MODULE_PATHS = {module_name(p): str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py"))}


def existing(dotted: str) -> str:
    """The deepest module of the package that `dotted` (relative) names or lies in."""
    while dotted and dotted not in MODULE_PATHS:
        dotted = dotted.rpartition(".")[0]
    return dotted


def edges_of(name: str, source: str) -> list[Edge]:
    """Every import in SOURCE (the text of module NAME), with the module each one reaches."""
    tree = ast.parse(source)
    is_package = module_path(name).endswith("__init__.py") if name in MODULE_PATHS else False
    package = name if is_package else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                edges.append(_edge(name, alias.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                absolute = ".".join(["deadrelu_cli", *base, *([node.module] if node.module else [])])
            else:
                absolute = node.module or ""
            for alias in node.names:
                submodule = f"{absolute}.{alias.name}"
                if submodule.startswith("deadrelu_cli.") and submodule[13:] in MODULE_PATHS:
                    edges.append(_edge(name, submodule, (), node.lineno))  # `from pkg import module`
                else:
                    edges.append(_edge(name, absolute, (alias.name,), node.lineno))
    return edges


def _edge(source: str, absolute: str, names: tuple[str, ...], line: int) -> Edge:
    if absolute == "deadrelu_cli" or absolute.startswith("deadrelu_cli."):
        return Edge(source, existing(absolute[13:]), names, line)
    return Edge(source, "EXTERNAL:" + absolute.split(".")[0], names, line)


@cache
def source_of(name: str) -> str:
    return (PACKAGE.parent / module_path(name)).read_text(encoding="utf-8")


@cache
def _package_edges() -> tuple[Edge, ...]:
    return tuple(edge for name in MODULE_PATHS for edge in edges_of(name, source_of(name)))


def package_edges() -> list[Edge]:
    return list(_package_edges())


def layer_of(name: str) -> int:
    best, best_length = None, -1
    for rank, (_, members) in enumerate(LAYERS):
        for member in members:
            if member.endswith("."):
                hit = name.startswith(member) or name == member[:-1]
            else:
                hit = name == member
            if hit and len(member) > best_length:  # the most specific entry wins (fixes.plan over fixes.)
                best, best_length = rank, len(member)
    if best is None:
        raise AssertionError(
            f"{module_path(name)} is in no layer: add it to LAYERS in tests/test_architecture.py "
            "and to the layer list in docs/architecture.md"
        )
    return best


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a closed path."""
    graph: dict[str, set[str]] = {name: set() for name in MODULE_PATHS}
    for edge in edges:
        if not edge.target.startswith("EXTERNAL:") and edge.target != edge.source:
            graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(_closed_path(sorted(component), graph))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _closed_path(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle through the component's first module, found by breadth-first search."""
    start, members = component[0], set(component)
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return component


def private_reach_ins(name: str, source: str) -> list[str]:
    """`from x import _y` and `x._y` where x is another module of the package."""
    found = []
    for edge in edges_of(name, source):
        if edge.target.startswith("EXTERNAL:") or edge.target == name:
            continue
        for imported in edge.names:
            if imported.startswith("_") and not imported.startswith("__"):
                found.append(f"{edge.where()}: imports {imported} from deadrelu_cli.{edge.target}")
    tree = ast.parse(source)
    aliases = {}  # local name -> module of the package it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deadrelu_cli.") and alias.asname:
                    aliases[alias.asname] = existing(alias.name[13:])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deadrelu_cli"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"[13:]
                if full in MODULE_PATHS:
                    aliases[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id] != name
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(
                f"{module_path(name)}:{node.lineno}: uses {node.value.id}.{node.attr} "
                f"(private to deadrelu_cli.{aliases[node.value.id]})"
            )
    return found


def layering_violations(edges: list[Edge]) -> list[str]:
    found: list[str] = []
    for edge in edges:
        source_rank = layer_of(edge.source)
        source_layer = LAYERS[source_rank][0]
        if edge.target.startswith("EXTERNAL:"):
            library = edge.target[9:]
            if source_layer in FRAMEWORK_FREE and library in FRAMEWORKS:
                found.append(f"{edge.where()}: the {source_layer} layer imports {library}")
            if source_layer != "cli" and library in CLI_ONLY:
                found.append(f"{edge.where()}: {library} belongs to the cli layer, not {source_layer}")
            continue
        target_rank = layer_of(edge.target)
        if target_rank > source_rank:
            found.append(
                f"{edge.where()}: imports deadrelu_cli.{edge.target or '(package)'} — layer "
                f"{LAYERS[target_rank][0]!r} is above {source_layer!r}"
            )
    return list(dict.fromkeys(found))  # `from x import a, b` is one edge per name: one message


def test_every_module_is_in_a_layer():
    for name in MODULE_PATHS:
        layer_of(name)


def test_no_import_cycles():
    found = cycles(package_edges())
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(
        " -> ".join(f"deadrelu_cli.{m}" if m else "deadrelu_cli" for m in path) for path in found
    )


def test_modules_import_only_from_layers_below():
    found = layering_violations(package_edges())
    assert not found, "layering broken:\n" + "\n".join(found)


def test_no_private_names_across_modules():
    found = [
        problem
        for name in MODULE_PATHS
        for problem in private_reach_ins(
            name, (PACKAGE.parent / module_path(name)).read_text(encoding="utf-8")
        )
    ]
    assert not found, "private names used across modules (make them public or move them):\n" + "\n".join(
        found
    )


# The checks themselves must be able to fail: each planted violation is caught and named.
@pytest.mark.parametrize(
    ("module", "planted", "expected"),
    [
        (
            "stats",
            "from deadrelu_cli.engine import run_scan\n",
            "imports deadrelu_cli.engine — layer 'orchestration' is above 'foundation'",
        ),
        ("report.table", "def f():\n    import torch\n", "the report layer imports torch"),
        ("gate", "from deadrelu_cli.cli.options import Loading\n", "layer 'cli' is above 'report'"),
        ("engine", "import typer\n", "typer belongs to the cli layer"),
    ],
)
def test_planted_layering_violation_is_named(module, planted, expected):
    edges = [e for e in package_edges() if e.source != module]
    edges += edges_of(module, planted)
    found = layering_violations(edges)
    assert any(expected in message and module_path(module) in message for message in found), found


def test_planted_cycle_is_named():
    edges = package_edges() + edges_of(
        "stats", "def f():\n    from deadrelu_cli.report.model import Report\n"
    )
    found = cycles(edges)
    assert ["report.model", "stats", "report.model"] in found, found


@pytest.mark.parametrize(
    "planted",
    [
        "from deadrelu_cli.report.table import _bar\n",
        "from deadrelu_cli.report import table\ntable._bar(0.5)\n",
        "import deadrelu_cli.report.table as t\nt._bar(0.5)\n",
        "def f():\n    from .report.table import _bar\n",
    ],
)
def test_planted_private_reach_in_is_named(planted):
    found = private_reach_ins("engine", planted)
    assert len(found) == 1 and "_bar" in found[0] and "deadrelu_cli/engine.py" in found[0], found
