"""The import graph of src/gradwise has no cycles, so its modules layer from the bottom up.

The graph is read from the source with ``ast``: an edge for every ``import`` and ``from ... import``
that runs when a module is imported (a package's ``__init__`` is a module like any other), not the
ones under ``if TYPE_CHECKING:``. Imports inside functions run later, but a cycle through them is
still a tangle; the second test holds those to the same rule.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

import gradwise

PACKAGE = Path(gradwise.__file__).parent
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
    return name == "TYPE_CHECKING"


def import_statements(node: ast.AST, in_functions: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements under ``node`` that run on import (``in_functions``: all of them)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _type_checking(child.test):
            for statement in child.orelse:
                yield from import_statements(ast.Module([statement], []), in_functions)
        elif in_functions or not isinstance(child, FUNCTIONS):
            yield from import_statements(child, in_functions)


def _innermost(name: str) -> str | None:
    """The module of src/gradwise that ``name`` (a module or an attribute of one) lies in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported(module: str, statement: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules of src/gradwise that ``statement`` in ``module`` imports."""
    if isinstance(statement, ast.Import):
        names = [alias.name for alias in statement.names]
    else:
        base = statement.module or ""
        if statement.level:  # relative: from its package, one level up per extra dot
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            package = package.rsplit(".", statement.level - 1)[0]
            base = f"{package}.{base}" if base else package
        names = [
            f"{base}.{alias.name}" for alias in statement.names
        ]  # a submodule, or an attribute
    return {m for m in map(_innermost, names) if m is not None and m != module}


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        statements = import_statements(tree, in_functions)
        graph[module] = set().union(*(imported(module, s) for s in statements))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each module on a cycle not yet reported: [a, b, ..., a]."""
    found: list[list[str]] = []
    reported: set[str] = set()
    for start in sorted(graph):
        if start in reported:
            continue
        parents: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            if start in graph.get(node, ()):
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                found.append([*reversed(path), start])
                reported.update(path)
                break
            for nxt in sorted(graph.get(node, ())):
                if nxt not in parents and nxt != start:
                    parents[nxt] = node
                    queue.append(nxt)
    return found


@pytest.mark.parametrize("in_functions", [False, True], ids=["module-level", "and-in-functions"])
def test_src_gradwise_imports_no_module_in_a_cycle(in_functions):
    found = cycles(import_graph(in_functions))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_graph_sees_what_runs_on_import():
    source = """
import gradwise.errors
from gradwise.deploy import card, INT8_NOT_A_MODULE
from gradwise.recipe import Recipe
from . import formats
from .. import trust
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from gradwise import trainer
else:
    import gradwise.facts
try:
    import gradwise.optim
except ImportError:
    import gradwise.nn
class Lazy:
    import gradwise.checkpoint
def later():
    import gradwise.advisor
"""
    module = "gradwise.deploy.export"
    tree = ast.parse(source)
    eager = set().union(*(imported(module, s) for s in import_statements(tree, False)))
    assert eager == {
        "gradwise.errors", "gradwise.deploy.card", "gradwise.deploy", "gradwise.recipe",
        "gradwise.deploy.formats", "gradwise.trust", "gradwise.facts", "gradwise.optim",
        "gradwise.nn", "gradwise.checkpoint",
    }  # fmt: skip
    everything = set().union(*(imported(module, s) for s in import_statements(tree, True)))
    assert everything - eager == {"gradwise.advisor"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"d", "e"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c", "a"], ["d", "d"]]
