"""The floors of ARCHITECTURE.md, checked from the code's own imports.

Each top-level package sits on a floor and may import only packages on floors below its own:
imports point down, so a package can be read (and changed) knowing only what is under it. The
check reads every import statement with the standard library's ``ast`` (function-level and
``TYPE_CHECKING`` imports included: a lazy import is still a dependency) and has no exception
list: an import that runs back up fails here, naming the file and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. Keep in step with ARCHITECTURE.md.
FLOORS: list[set[str]] = [
    {"config", "guest_agent", "vm_templates"},  # ground: imports nothing of the project
    {"store"},  # the event log, the database
    {"sandboxes", "llm"},  # machines and their guests; the model proxy
    {"activities"},  # what workflows ask of the world, and its contracts
    {"workflows"},  # durable orchestration; how to reach it
    {"api"},  # the JSON API and its service layer
    {"ui"},  # the dashboard
    {"berth"},  # entry points and composition: the CLI, the supervisor, the worker, the app
    {"bench"},  # benchmarks, which start the whole system
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}
# Packages that take what they need as values from the floor above and never read the
# settings object: a provider gets a Host, not Settings.
NO_SETTINGS = {"sandboxes", "store", "guest_agent", "vm_templates"}


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def modules() -> list[tuple[str, Path]]:
    return [
        (path.relative_to(ROOT).parts[0], path)
        for package in FLOOR
        for path in sorted((ROOT / package).rglob("*.py"))
        if "node_modules" not in path.parts
    ]


def test_every_package_has_a_floor() -> None:
    packages = {
        path.parent.name for path in ROOT.glob("*/__init__.py") if path.parent.name != "tests"
    }
    assert packages == set(FLOOR), "give each top-level package a floor here and in the doc"


def test_imports_point_down() -> None:
    upward: list[str] = []
    for package, path in modules():
        for line, target in imported(ast.parse(path.read_text(), str(path))):
            if target in FLOOR and target != package and FLOOR[target] >= FLOOR[package]:
                where = path.relative_to(ROOT)
                upward.append(f"{where}:{line} imports {target} (floor {FLOOR[target]})")
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_the_lower_floors_take_values_not_settings() -> None:
    readers = [
        f"{path.relative_to(ROOT)}:{line}"
        for package, path in modules()
        if package in NO_SETTINGS
        for line, target in imported(ast.parse(path.read_text(), str(path)))
        if target == "config"
    ]
    assert not readers, "these read the settings: pass them a value instead:\n" + "\n".join(readers)


def test_the_check_sees_an_import_that_runs_back_up() -> None:
    """The checker itself: a made-up module of the store importing the API is caught."""
    tree = ast.parse("import os\nfrom api.deps import DbDep\n\ndef f():\n    import ui.pages\n")
    targets = {target for _, target in imported(tree)}
    assert {"api", "ui"} <= targets
    assert all(FLOOR[target] > FLOOR["store"] for target in ("api", "ui"))
