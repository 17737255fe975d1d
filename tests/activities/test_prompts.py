"""The planner's system prompt is built from the session's sandbox: two templates with
different policies, images and networks give prompts that differ accordingly."""

from __future__ import annotations

from pathlib import Path

import pytest

import vm_templates
from activities.prompts import planner_prompt
from activities.replies import plan_schema
from sandboxes.policy.brief import rules_named
from sandboxes.policy.rules import load_policy

RICH = """\
home = "/home/berth"
workspace = ["/home/berth", "/tmp"]
[programs.ls]
[programs.python3]
script = true
paths = "workspace"
forbid = ["-c"]
[programs.find]
forbid = ["-exec", "-delete"]
check = "find"
"""
BARE = """\
home = "/home/berth"
workspace = ["/home/berth"]
allow_pipes = false
allow_chaining = false
[programs.ls]
[programs.cat]
[programs.echo]
max_args = 1
"""


@pytest.fixture
def templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two templates: `rich` (a browser, python3, public network) and `bare` (no browser,
    no python3, no pipes or chaining, no network)."""
    for name, policy, packages, python, egress in [
        ("rich", RICH, "python3\nchromium\njq\n", "playwright\n", "public"),
        ("bare", BARE, "coreutils\n", "", "gateway"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "policy.toml").write_text(policy)
        (folder / "packages").write_text(packages)
        (folder / "python-packages").write_text(python)
        (folder / "template.toml").write_text(f'[network]\negress = "{egress}"\n')
    monkeypatch.setattr(vm_templates, "ROOT", tmp_path)
    return tmp_path


def test_the_prompt_lists_each_templates_own_rules_kinds_and_tools(templates: Path) -> None:
    rich = planner_prompt("rich", load_policy("rich"))
    bare = planner_prompt("bare", load_policy("bare"))
    # The programs and their argument rules come from each policy.
    assert "python3: script files only" in rich and "refused: -c" in rich
    assert "find: no actions that run" in rich and "python3" not in bare.split("policy:")[1]
    assert "echo: at most 1 argument(s)" in bare and "echo" not in rich
    # What to do instead of refused syntax: a script where python3 runs scripts.
    assert "run it with `python3 FILE.py`" in rich
    assert "run it with `python3" not in bare and "one command per step" in bare
    assert "Also refused by this template: chaining (one command per step), pipes" in bare
    # Step kinds: a browser only where the image has one.
    assert '"kind": "browser"' in rich and "page_text_contains" in rich
    assert '"kind": "browser"' not in bare and "(no browser in this sandbox)" in bare
    # Workspace, user, installed tools, network.
    assert "files may be written only in /home/berth and /tmp" in rich
    assert "files may be written only in /home/berth." in bare
    assert "as the user 'berth' in /home/berth" in bare
    assert (
        "python3, chromium, jq" in rich
        and "Python packages beyond the standard library: playwright" in rich
    )
    assert "Python packages beyond the standard library: none" in bare
    assert "may reach the internet" in rich and "reaches no network" in bare


def test_the_schema_offers_only_the_kinds_the_guest_runs() -> None:
    kinds = plan_schema(("terminal", "file"))["properties"]["steps"]["items"]["properties"]
    assert kinds["kind"]["enum"] == ["terminal", "file"] and "action" not in kinds
    every = plan_schema()["properties"]["steps"]["items"]["properties"]
    assert every["kind"]["enum"] == ["terminal", "browser", "file", "service"]
    # A service is stopped by its name, with the action browser steps also name.
    assert "name" in every and {"start", "stop", "click"} <= set(
        every["action"]["anyOf"][0]["enum"]
    )


def test_a_refusal_quotes_the_rules_of_the_programs_the_line_names() -> None:
    policy = load_policy("default")
    assert rules_named(policy, "ls | python3 -c x; bash") == [
        "python3: script files only (`python3 FILE [args]`); -m only with venv, pip, unittest, "
        "py_compile, json.tool; paths in the workspace; refused: -c -i -W -X "
        "--check-hash-based-pycs",
    ]
