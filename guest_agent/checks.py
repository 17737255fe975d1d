"""A step's success criterion, checked in the guest right after the step ran: plain
comparisons on what the step left behind, nothing a model judges.

The agent is root, the check the step's author's: a check that looks at files does so with
the step user's rights (it cannot tell whether a root-only file exists), and a regular
expression is matched in a child process, as that user, killed after ``REGEX_TIMEOUT_S``
(a catastrophic pattern would otherwise hold the agent's event loop, and its heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from guest_agent.user import StepUser, own_environment, with_rights

SHOWN_CHARS = 120
# How long a regex check may take to match: far more than any sane pattern needs.
REGEX_TIMEOUT_S = 5.0
# The child that matches: pattern, text and flags in on stdin, the match (or the pattern's
# error) out on stdout, as JSON.
_SEARCH = (
    "import json, re, sys\n"
    "pattern, text, flags = json.load(sys.stdin)\n"
    "try:\n"
    "    found = re.search(pattern, text, flags)\n"
    "except re.error as exc:\n"
    "    print(json.dumps({'error': str(exc)}))\n"
    "else:\n"
    "    print(json.dumps({'match': None if found is None else found.group(0)}))\n"
)


class Unjudged(Exception):
    """The check could not be evaluated: the detail says why."""


@dataclass
class Facts:
    """What a step left behind, as far as checks can see."""

    exit_code: int
    output: str
    workdir: str
    url: str | None = None  # browser steps: the page's URL afterwards
    page_text: str | None = None  # browser steps: the page's visible text afterwards


async def evaluate(
    check: dict[str, Any] | None, facts: Facts, user: StepUser | None = None
) -> dict[str, Any] | None:
    """The check's outcome as ``{kind, ok, detail}``, or None without a check; files and
    patterns are looked at with ``user``'s rights, if given."""
    if check is None:
        return None
    kind, value = str(check.get("kind")), str(check.get("value", ""))
    try:
        ok, detail = await _judge(kind, value, facts, user)
    except Unjudged as exc:
        ok, detail = False, str(exc)
    except OSError as exc:  # the user's file rights could not be taken
        ok, detail = False, f"cannot check {_shown(value)}: {exc}"
    return {"kind": kind, "ok": ok, "detail": detail}


async def _judge(kind: str, value: str, facts: Facts, user: StepUser | None) -> tuple[bool, str]:
    match kind:
        case "exit_code":
            ok = str(facts.exit_code) == value.strip()
            return ok, f"exit code {facts.exit_code}, expected {value.strip()}"
        case "output_contains":
            return _contains("output", value, facts.output)
        case "output_regex":
            found = await search(value, facts.output, re.MULTILINE, user)
            if found is None:
                return False, f"/{_shown(value)}/ matches nothing in the output"
            return True, f"/{_shown(value)}/ matched {_shown(found)!r}"
        case "file_exists":
            path = os.path.join(facts.workdir, value)
            return await asyncio.to_thread(with_rights, user, _exists, path, value)
        case "url_matches":
            if facts.url is None:
                return False, "no page is open"
            ok = await search(value, facts.url, 0, user) is not None
            verb = "matches" if ok else "does not match"
            return ok, f"page URL {_shown(facts.url)} {verb} /{_shown(value)}/"
        case "page_text_contains":
            if facts.page_text is None:
                return False, "no page is open"
            return _contains("page text", value, facts.page_text)
    return False, f"unknown check {_shown(kind)!r}"


def _exists(path: str, value: str) -> tuple[bool, str]:
    """Whether ``path`` exists, as the calling thread's file rights see it."""
    if os.path.isdir(path):
        return True, f"{_shown(value)} exists (a directory)"
    if os.path.exists(path):
        return True, f"{_shown(value)} exists ({os.path.getsize(path)} bytes)"
    return False, f"{_shown(value)} does not exist"


async def search(pattern: str, text: str, flags: int, user: StepUser | None = None) -> str | None:
    """What ``pattern`` first matches in ``text`` (None: nothing), found by a child process
    (as ``user``) given ``REGEX_TIMEOUT_S``; Unjudged if the pattern is bad or too slow."""
    argv = [sys.executable, "-I", "-c", _SEARCH]
    try:
        process = await asyncio.create_subprocess_exec(
            *(user.command(argv) if user else argv),
            cwd="/",
            env=user.environment() if user else own_environment(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        raise Unjudged(f"cannot match /{_shown(pattern)}/: {exc}") from None
    try:
        out, _ = await asyncio.wait_for(
            process.communicate(json.dumps([pattern, text, flags]).encode()), REGEX_TIMEOUT_S
        )
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise Unjudged(
            f"/{_shown(pattern)}/ took more than {REGEX_TIMEOUT_S:g} s to match: refused"
        ) from None
    try:
        answer = json.loads(out)
    except ValueError:
        raise Unjudged(f"matching /{_shown(pattern)}/ failed (exit {process.returncode})") from None
    if "error" in answer:
        raise Unjudged(f"bad regex /{_shown(pattern)}/: {answer['error']}")
    found: str | None = answer["match"]
    return found


def _contains(where: str, value: str, text: str) -> tuple[bool, str]:
    if value in text:
        return True, f"{_shown(value)!r} found in the {where} ({len(text)} characters)"
    return False, f"{_shown(value)!r} not found in the {where} ({len(text)} characters)"


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"
