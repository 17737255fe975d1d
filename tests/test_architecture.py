"""The floors of ARCHITECTURE.md, checked from the code's own imports.

Each top-level package sits on a floor (the command line, which starts everything, on the roof
above the benchmarks) and may import only what is on floors below its own: imports point down,
so a package can be read (and changed) knowing only what is under it. The
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
    {"config", "guest_agent", "vm_templates", "telemetry"},  # ground: imports nothing of ours
    {"store"},  # the event log, the database
    {"sandboxes", "llm"},  # machines and their guests; the model proxy
    {"activities"},  # what workflows ask of the world, and its contracts
    {"workflows"},  # durable orchestration; how to reach it
    {"api"},  # the JSON API and its service layer
    {"ui"},  # the dashboard
    {"berth"},  # composition and processes: the supervisor, the worker, the app, the host
    {"bench"},  # benchmarks, which start the whole system
    {"berth.cli", "berth.__main__"},  # the roof: one command line for all of the above
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}
PACKAGES = {name for name in FLOOR if "." not in name}


def floor_of(module: str) -> int | None:
    """The floor of a module: its longest dotted prefix that has one (None: not the project's)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        level = FLOOR.get(".".join(parts[:end]))
        if level is not None:
            return level
    return None


# Packages that take what they need as values from the floor above and never read the
# settings object: a provider gets a Host, not Settings.
NO_SETTINGS = {"sandboxes", "store", "guest_agent", "vm_templates", "telemetry"}


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module of the project's packages."""
    return [
        (".".join(path.relative_to(ROOT).with_suffix("").parts), path)
        for package in sorted(PACKAGES)
        for path in sorted((ROOT / package).rglob("*.py"))
        if "node_modules" not in path.parts
    ]


def test_every_package_has_a_floor() -> None:
    packages = {
        path.parent.name for path in ROOT.glob("*/__init__.py") if path.parent.name != "tests"
    }
    assert packages == PACKAGES, "give each top-level package a floor here and in the doc"


def test_imports_point_down() -> None:
    upward: list[str] = []
    for module, path in modules():
        own = floor_of(module)
        assert own is not None
        for line, target in imported(ast.parse(path.read_text(), str(path))):
            level = floor_of(target)
            if level is None or (target.split(".")[0] == module.split(".")[0] and level <= own):
                continue  # not the project's, or within a package (and not up to its roof)
            if level >= own:
                where = path.relative_to(ROOT)
                upward.append(f"{where}:{line} imports {target} (floor {level} >= {own})")
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_the_lower_floors_take_values_not_settings() -> None:
    readers = [
        f"{path.relative_to(ROOT)}:{line}"
        for module, path in modules()
        if module.split(".")[0] in NO_SETTINGS
        for line, target in imported(ast.parse(path.read_text(), str(path)))
        if target.split(".")[0] == "config"
    ]
    assert not readers, "these read the settings: pass them a value instead:\n" + "\n".join(readers)


def test_the_check_sees_an_import_that_runs_back_up() -> None:
    """The checker itself: a made-up module of the store importing the API is caught."""
    tree = ast.parse("import os\nfrom api.deps import DbDep\n\ndef f():\n    import ui.pages\n")
    targets = {target for _, target in imported(tree)}
    assert {"api.deps", "ui.pages"} <= targets
    store = floor_of("store.events")
    assert store is not None
    assert all((floor_of(target) or 0) > store for target in ("api.deps", "ui.pages"))
    assert floor_of("berth.cli") == len(FLOORS) - 1 and floor_of("berth.worker") == FLOOR["berth"]
