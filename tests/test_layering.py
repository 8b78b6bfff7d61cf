"""The dependency graph: `common/` imports neither program, the programs never import each other, no cycles."""

from __future__ import annotations

from pathlib import Path

from tests.test_hardening_export import ROOT, project_imports

PACKAGES = ("common", "trainer", "evaluator")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports (at the top or inside a function)."""
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        found = set()
        for imported in project_imports(path):
            # `from common import datasets` names the module `common.datasets`; keep the longest known name.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                found.add(imported)
        edges[name] = found
    return edges


def test_common_imports_neither_program_and_the_programs_not_each_other() -> None:
    strays = []
    for name, imports in graph().items():
        top = name.split(".")[0]
        for imported in imports:
            other = imported.split(".")[0]
            if other != top and other != "common":
                strays.append(f"{name} -> {imported}")
    assert not strays


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles
