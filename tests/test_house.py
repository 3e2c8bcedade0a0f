"""The package's layout: no import cycle between its modules, function-level imports counted."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# The outcome does not depend on library versions: CI runs this file in the default environment only.
pytestmark = pytest.mark.anyversion

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "image_transfer"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (parent packages left out)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_function_level_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_folder_says_what_lives_there():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} has no docstring"
        if init.parent != PACKAGE:
            assert "May import" in doc, f"{init}: say what the folder may import"


def test_no_module_shadows_the_standard_library():
    import sys

    names = {p.stem for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)


def test_the_public_api_imports_as_documented():
    import image_transfer

    for name in image_transfer.__all__:
        assert hasattr(image_transfer, name), name
    assert {
        "read_images",
        "score_images",
        "featurize_images",
        "scoring_run",
        "score_new_images",
        "featurize_new_images",
        "UserError",
        "RunFailed",
        "TooManyFailures",
    } <= set(image_transfer.__all__)
