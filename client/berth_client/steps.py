"""Tasks of one step written by a program, not planned by the model: a prompt that is
``{"steps": [...]}`` runs those steps as written (terminal, browser or file; the server's
sandboxes/models.py says what each takes), through the same command policy, limits and
audit as any task. The workspace has no file routes: files are read, written and listed by
such steps (text, the first 8,000 characters of a read)."""

from __future__ import annotations

import json
from typing import Any

from berth_client.models import StepOut


def plan(*steps: dict[str, Any]) -> str:
    """The prompt that runs ``steps`` as written."""
    return json.dumps({"steps": list(steps)})


def terminal(command: str) -> dict[str, Any]:
    return {"kind": "terminal", "command": command}


def read_file(path: str) -> dict[str, Any]:
    return {"kind": "file", "op": "read", "path": path}


def write_file(path: str, content: str) -> dict[str, Any]:
    return {"kind": "file", "op": "write", "path": path, "content": content}


def list_files(path: str = ".") -> dict[str, Any]:
    return {"kind": "file", "op": "list", "path": path}


def browser(action: str, **given: str | float | None) -> dict[str, Any]:
    """A browser action (navigate url, click selector, type selector text, extract
    [selector], screenshot, ...); arguments given as None are left out."""
    return {"kind": "browser", "action": action} | {k: v for k, v in given.items() if v is not None}


def content(step: StepOut) -> str:
    """What a step read: a file's content or a folder's listing, a page's text; else its
    terminal output."""
    found = (step.result or {}).get("content") or (step.result or {}).get("text")
    return str(found) if found is not None else step.output
