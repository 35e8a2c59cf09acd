"""Arrows one way: no module of rotator imports, however late, a module that imports it back.

Every import counts: at the top, inside a function (a late import hides a cycle from Python, not
from a reader) and under TYPE_CHECKING. A graph without a cycle is one that can be drawn as floors
with every arrow pointing down.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rotator"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The rotator modules `path` imports anywhere in it (`from a import b` counts `a.b` when that is a
    module, and `a`, whose __init__ runs first, unless `a` is the importing module's own package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.update({f"{base}.{alias.name}" for alias in node.names} & modules)
            # Python runs `base`'s __init__ for any import from it; only a module's own package is
            # exempt (importing a sibling from its package is no arrow back up).
            if not name.startswith(f"{base}."):
                found.add(base)
    # Importing `a.b.c` runs `a.b`'s __init__ first: an arrow too, unless `a.b` is the importer's own package.
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, len(m.split(".")))}
    found |= {p for p in parents if not name.startswith(f"{p}.")}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    assert graph["rotator.cli"] and graph["rotator.engine"]  # the scan reads real imports
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"an import cycle: {' -> '.join(exc.args[1])}") from None


def test_the_scan_sees_a_late_import() -> None:
    """An import inside a function is an arrow too (how the last cycles hid): the CLI's `scan`
    imports what builds the key service only inside the command, and the graph has that arrow."""
    top = {node.module for node in ast.parse((PACKAGE / "cli" / "views.py").read_text()).body
           if isinstance(node, ast.ImportFrom)}
    assert "rotator.runtime" not in top and "rotator.runtime" in import_graph()["rotator.cli.views"]


def test_the_rotation_core_is_in_rooms_a_reader_can_hold() -> None:
    """rotator/engine: no module over 400 lines, no function over 60, the Engine facade under 150."""
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        text = path.read_text()
        assert text.count("\n") <= 400, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 60, f"{path.name}: {node.name}"  # type: ignore[operator]
            if isinstance(node, ast.ClassDef) and node.name == "Engine":
                assert node.end_lineno - node.lineno < 150  # type: ignore[operator]


def test_every_transition_is_performed_by_one_linked_function() -> None:
    """Each row of protocol.TRANSITIONS names the function that performs it, and docs/protocol.md
    shows that table (with its "Reading the code" walk)."""
    from rotator.engine import PERFORMED_BY, steps_table
    from rotator.protocol import TRANSITIONS

    assert set(PERFORMED_BY) == set(TRANSITIONS)
    for function in PERFORMED_BY.values():
        assert function.__module__.startswith("rotator.engine."), function
    doc = (PACKAGE.parent / "docs" / "protocol.md").read_text()
    assert steps_table() in doc and "## Reading the code" in doc


#: The rotation core's floors, lowest first, as rotator/engine/__init__.py and docs/protocol.md list them.
ENGINE_ORDER = ["values", "context", "successors", "report", "sinkio", "lineage", "records", "store", "overlap",
                "attempt", "flow", "reconcile"]


def test_the_rotation_core_imports_only_the_floors_below() -> None:
    """Each module of rotator/engine imports only modules listed before it (an arrow up the list,
    even one that makes no cycle yet, is what a later change turns into one)."""
    graph = import_graph()
    assert sorted(ENGINE_ORDER) == sorted(p.stem for p in (PACKAGE / "engine").glob("*.py") if p.stem != "__init__")
    for index, name in enumerate(ENGINE_ORDER):
        above = {f"rotator.engine.{n}" for n in ENGINE_ORDER[index:]}
        assert not graph[f"rotator.engine.{name}"] & above, (name, graph[f"rotator.engine.{name}"] & above)
