"""The project's import graph, read from source: every import resolved to the module it names.

`from common.data import datasets` is an edge to `common.data.datasets`, not to the package
`common.data`; `from common.storage import open_storage` is an edge to `common.storage` (the
package's `__init__`), since `open_storage` is not a module. Imports inside functions (lazy
imports) are edges too, and are counted apart so that they stay few and visible.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable
from pathlib import Path

PROGRAMS = ("trainer", "evaluator")
PACKAGES = ("common", *PROGRAMS)

# The order of `common`'s layers, lowest first: a module may import its own layer and the ones below,
# never one above; each program sits above all of `common`, and neither imports the other.
# `common.layout` holds file names and keys and imports nothing of the project; `common.distribute` (the
# tf.distribute strategy both programs build from their flags) imports only `common.errors`.
LAYERS = (
    ("common", "common.distribute", "common.errors", "common.layout", "common.reference", "common.signals",
     "common.tfenv", "common.cluster"),
    ("common.storage",),
    ("common.data",),
    ("common.model",),
    ("common.checkpoint",),
    ("common.run",),
)


@dataclasses.dataclass(frozen=True)
class Edge:
    """One import of one project module by another."""

    importer: str
    imported: str
    lazy: bool  # inside a function (or a class body), not at the module's top level
    line: int


def module_name(path: Path, root: Path) -> str:
    """`common/data/datasets.py` -> `common.data.datasets`; a package's `__init__.py` -> the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module) -> Iterable[tuple[str, list[str], bool, int]]:
    """Each import: the module it names, the names taken from it (`from m import a, b`), lazy or not, its line."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], id(node) not in top, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, [alias.name for alias in node.names], id(node) not in top, node.lineno


def read_graph(root: Path, packages: Iterable[str] = PACKAGES) -> tuple[set[str], list[Edge]]:
    """The project's modules under `root` and every import edge between them."""
    paths = {module_name(p, root): p for package in packages for p in sorted((root / package).rglob("*.py"))}
    edges = []
    for name, path in paths.items():
        for module, taken, lazy, line in _imports(ast.parse(path.read_text(), str(path))):
            # `from pkg import mod` is an edge to pkg.mod; `from pkg import function` one to pkg.
            targets = [f"{module}.{n}" if f"{module}.{n}" in paths else _known_prefix(module, paths) for n in taken]
            for target in dict.fromkeys(targets or [_known_prefix(module, paths)]):
                if target and target != name:
                    edges.append(Edge(name, target, lazy, line))
    return set(paths), edges


def _known_prefix(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of dotted `name` that is a project module, or '' (not the project's)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def cycles(modules: set[str], edges: list[Edge]) -> list[list[str]]:
    """Every cycle that a depth-first walk meets, each as its modules with the first repeated last."""
    after: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        after[edge.importer].add(edge.imported)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(after[node]):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(after):
        if node not in state:
            visit(node, [node])
    return found


def layer_of(module: str) -> int:
    """The layer index of a module: `common`'s layers in order, then the programs above them all."""
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(f"{m}.") for m in members if m != "common") or module == "common":
            return index
    if module.split(".")[0] in PROGRAMS:
        return len(LAYERS)
    raise ValueError(f"{module} belongs to no layer: add it to tests/layering.LAYERS")


def order_violations(edges: list[Edge]) -> list[str]:
    """Edges that go up the layers, or from one program to the other, or out of `common.layout`."""
    bad = []
    for e in edges:
        up = layer_of(e.imported) > layer_of(e.importer)
        across = e.importer.split(".")[0] in PROGRAMS and e.imported.split(".")[0] in PROGRAMS and \
            e.importer.split(".")[0] != e.imported.split(".")[0]
        if up or across or e.importer == "common.layout":
            bad.append(f"{e.importer} -> {e.imported} (line {e.line}{', lazy' if e.lazy else ''})")
    return bad
