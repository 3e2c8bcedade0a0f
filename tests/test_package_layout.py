"""The package's layout: each folder imports only what its docstring's "May import" allows (function-level
imports counted), no import cycle between modules, and small functions."""

from __future__ import annotations

import ast
import re
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


def folders() -> set[str]:
    """The package's folders (``scoring``, ``scoring.engines``), each a layer with a rule of its own."""
    return {".".join(p.parent.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("*/__init__.py")}


def unit(module: str, layers: set[str] | None = None) -> str:
    """The layer a module belongs to: its deepest folder, or the top-level module itself (``image_transfer``
    for the root)."""
    short = module.split(".", 1)[1] if "." in module else module
    parts = short.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in (folders() if layers is None else layers):
            return ".".join(parts[:n])
    return parts[0] if "." in module else module


def allowed_imports() -> dict[str, set[str]]:
    """Each layer's "May import" list, from its folder's ``__init__`` (or its module's) docstring."""
    rules: dict[str, set[str]] = {"image_transfer": {"api", "version", "errors"}, "__main__": {"jobs"}}
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("__init__", "__main__"):
            continue
        rules[path.stem] = parse_may_import(path)
    for folder in folders():
        rules[folder] = parse_may_import(PACKAGE.joinpath(*folder.split("."), "__init__.py"))
    return rules


def parse_may_import(path: Path) -> set[str]:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    found = re.search(r"May import:(.*?)(?:\n\n|$)", doc, re.S)
    assert found, f"{path}: its docstring says nothing of what it may import (a 'May import:' paragraph)"
    text = found.group(1)
    return set() if "nothing of the package" in text else set(re.findall(r"``([\w.]+)``", text))


def forbidden_imports(graph: dict[str, set[str]], rules: dict[str, set[str]]) -> list[str]:
    """``module -> target`` for each import outside the module's layer that its layer's rule does not allow.

    A rule entry is a layer (``scoring``) or one module of it (``scoring.options``). A folder may import
    the folders inside it (``scoring`` imports ``scoring.engines``); an inner folder keeps its own rule.
    """
    layers = {name for name in rules if name not in ("image_transfer", "__main__")}
    bad = []
    for module, targets in graph.items():
        here = unit(module, layers)
        for target in targets:
            there = unit(target, layers)
            if there == here or there.startswith(here + "."):
                continue
            short = target.split(".", 1)[1] if "." in target else target
            allowed = rules.get(here, set())
            if there not in allowed and not any(short == a or short.startswith(a + ".") for a in allowed):
                bad.append(f"{module} -> {target}")
    return sorted(bad)


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


def test_every_layer_imports_only_what_it_may():
    assert forbidden_imports(import_graph(), allowed_imports()) == []


def test_the_layer_check_finds_a_forbidden_import_anywhere_in_a_module(tmp_path):
    rules = {
        "training": {"errors", "scoring"},
        "scoring": {"errors"},
        "scoring.engines": {"errors", "scoring.options"},
        "jobs": {"api", "scoring.options"},
        "storage": set(),
        "errors": set(),
    }
    graph = {
        "image_transfer.training.prepare": {"image_transfer.storage.outputs", "image_transfer.training.feed"},
        "image_transfer.scoring.frame": {"image_transfer.errors", "image_transfer.scoring.engines.litert"},
        "image_transfer.scoring.engines.litert": {"image_transfer.scoring.options", "image_transfer.scoring.frame"},
        "image_transfer.jobs.cli": {"image_transfer.scoring.options", "image_transfer.scoring.frame"},
    }
    assert forbidden_imports(graph, rules) == [
        "image_transfer.jobs.cli -> image_transfer.scoring.frame",
        "image_transfer.scoring.engines.litert -> image_transfer.scoring.frame",
        "image_transfer.training.prepare -> image_transfer.storage.outputs",
    ]
    # A function-level import is an edge like any other.
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from image_transfer.api import score_images\n")
    found = {n.module for n in ast.walk(ast.parse(module.read_text())) if isinstance(n, ast.ImportFrom)}
    assert found == {"image_transfer.api"}


def test_layers_only_point_down():
    """No two layers may import each other: the rules themselves are a hierarchy."""
    rules = allowed_imports()
    for layer, allowed in rules.items():
        for other in allowed:
            base = other.split(".")[0]
            assert base == layer or layer not in rules.get(base, set()), f"{layer} and {base} may import each other"


MAX_LINES = 80


def test_no_function_is_a_big_room():
    """Functions stay under ~80 lines (ruff's C901 holds their complexity to 15)."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


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
