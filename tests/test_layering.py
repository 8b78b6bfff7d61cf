"""The dependency order of the code: no import cycles, `common`'s layers in order, neither program importing the other.

The checker (tests/layering.py) is tested too, on small planted trees: a checker that cannot fail
would pass whatever the code does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import layering
from tests.helpers import REPO

# Imports inside functions: the programs' entry points defer TensorFlow (and the workdir, which
# reads checkpoints through it) so that `--help` and a bad flag answer without it; `common.storage`
# imports an implementation only when it opens one; `common.run.spec` builds a model only when a
# run needs one. A new one is added here on purpose.
LAZY_IMPORTS_AT_MOST = 30


def test_the_project_has_no_import_cycle() -> None:
    assert layering.cycles(*layering.read_graph(REPO)) == []


def test_imports_follow_the_package_order() -> None:
    _, edges = layering.read_graph(REPO)
    assert layering.order_violations(edges) == []


def test_every_module_has_a_layer() -> None:
    modules, _ = layering.read_graph(REPO)
    for module in modules:
        layering.layer_of(module)  # raises for a module no layer names


def test_lazy_imports_stay_few() -> None:
    _, edges = layering.read_graph(REPO)
    lazy = sorted(f"{e.importer} -> {e.imported}" for e in edges if e.lazy)
    assert len(lazy) <= LAZY_IMPORTS_AT_MOST, "\n".join(lazy)


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("common", "trainer", "evaluator"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_the_checker_finds_a_cycle_through_from_package_import_module(tmp_path: Path) -> None:
    # The form the old checker collapsed onto the package node `common.model`, and so missed.
    root = _plant(tmp_path, {
        "common/model/__init__.py": "",
        "common/model/models.py": "def build():\n    from common.model import usermodel\n",
        "common/model/usermodel.py": "from common.model import models\n",
    })
    found = layering.cycles(*layering.read_graph(root))
    assert found == [["common.model.models", "common.model.usermodel", "common.model.models"]]


def test_the_checker_finds_a_longer_cycle_and_none_where_there_is_none(tmp_path: Path) -> None:
    root = _plant(tmp_path, {
        "common/a.py": "from common.b import x\n",
        "common/b.py": "import common.c\n",
        "common/c.py": "from common import a\n",
        "common/d.py": "from common import a, b\n",
    })
    assert layering.cycles(*layering.read_graph(root)) == [["common.a", "common.b", "common.c", "common.a"]]
    (root / "common" / "c.py").write_text("import os\n")
    assert layering.cycles(*layering.read_graph(root)) == []


def test_the_checker_resolves_names_to_modules_and_marks_lazy_imports(tmp_path: Path) -> None:
    root = _plant(tmp_path, {
        "common/storage/__init__.py": "def open_storage():\n    from common.storage.local import Local\n",
        "common/storage/local.py": "class Local: ...\n",
        "common/errors.py": "",
        "trainer/loop.py": "from common.storage import open_storage, local\nfrom common.errors import E\n",
    })
    _, edges = layering.read_graph(root)
    assert {(e.importer, e.imported, e.lazy) for e in edges} == {
        ("common.storage", "common.storage.local", True),
        ("trainer.loop", "common.storage", False),
        ("trainer.loop", "common.storage.local", False),
        ("trainer.loop", "common.errors", False),
    }


@pytest.mark.parametrize(("importer", "line", "why"), [
    ("common/storage/local.py", "from common.run import protocol\n", "common.storage.local -> common.run.protocol"),
    ("common/layout.py", "from common import errors\n", "common.layout -> common.errors"),
    ("trainer/loop.py", "from evaluator import ledger\n", "trainer.loop -> evaluator.ledger"),
])
def test_the_checker_refuses_an_import_against_the_order(tmp_path: Path, importer: str, line: str, why: str) -> None:
    root = _plant(tmp_path, {
        "common/storage/__init__.py": "", "common/run/__init__.py": "", "common/run/protocol.py": "",
        "common/errors.py": "", "evaluator/ledger.py": "", importer: line,
    })
    _, edges = layering.read_graph(root)
    assert [v.partition(" (")[0] for v in layering.order_violations(edges)] == [why]
