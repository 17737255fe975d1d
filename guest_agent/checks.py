"""A step's success criterion, checked in the guest right after the step ran: plain
comparisons on what the step left behind, nothing a model judges."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

SHOWN_CHARS = 120


@dataclass
class Facts:
    """What a step left behind, as far as checks can see."""

    exit_code: int
    output: str
    workdir: str
    url: str | None = None  # browser steps: the page's URL afterwards
    page_text: str | None = None  # browser steps: the page's visible text afterwards


def evaluate(check: dict[str, Any] | None, facts: Facts) -> dict[str, Any] | None:
    """The check's outcome as ``{kind, ok, detail}``, or None without a check."""
    if check is None:
        return None
    kind, value = str(check.get("kind")), str(check.get("value", ""))
    try:
        ok, detail = _judge(kind, value, facts)
    except re.error as exc:
        ok, detail = False, f"bad regex /{_shown(value)}/: {exc}"
    return {"kind": kind, "ok": ok, "detail": detail}


def _judge(kind: str, value: str, facts: Facts) -> tuple[bool, str]:
    match kind:
        case "exit_code":
            ok = str(facts.exit_code) == value.strip()
            return ok, f"exit code {facts.exit_code}, expected {value.strip()}"
        case "output_contains":
            return _contains("output", value, facts.output)
        case "output_regex":
            found = re.search(value, facts.output, re.MULTILINE)
            if found is None:
                return False, f"/{_shown(value)}/ matches nothing in the output"
            return True, f"/{_shown(value)}/ matched {_shown(found.group(0))!r}"
        case "file_exists":
            path = os.path.join(facts.workdir, value)
            if os.path.isdir(path):
                return True, f"{_shown(value)} exists (a directory)"
            if os.path.exists(path):
                return True, f"{_shown(value)} exists ({os.path.getsize(path)} bytes)"
            return False, f"{_shown(value)} does not exist"
        case "url_matches":
            if facts.url is None:
                return False, "no page is open"
            ok = re.search(value, facts.url) is not None
            verb = "matches" if ok else "does not match"
            return ok, f"page URL {_shown(facts.url)} {verb} /{_shown(value)}/"
        case "page_text_contains":
            if facts.page_text is None:
                return False, "no page is open"
            return _contains("page text", value, facts.page_text)
    return False, f"unknown check {_shown(kind)!r}"


def _contains(where: str, value: str, text: str) -> tuple[bool, str]:
    if value in text:
        return True, f"{_shown(value)!r} found in the {where} ({len(text)} characters)"
    return False, f"{_shown(value)!r} not found in the {where} ({len(text)} characters)"


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"
