"""Plans written by hand, in one of two forms. A prompt whose every non-empty line starts
with ``$ `` is a plan of terminal steps, one per line (``$ service: COMMAND`` starts COMMAND
as a service, ``$ service-stop: NAME`` stops one: see ServiceStep); a prompt that is a JSON object
``{"steps": [...]}`` is a plan of steps of any kind (terminal, browser, file), each as
sandboxes/models.py has it: what a program (the MCP server's tools) sends for one browser
action or one file operation. Pure functions, so the workflow parses such a plan itself (no
activity, no history events) and the API refuses an oversized or malformed one up front."""

from __future__ import annotations

import json
import re

from pydantic import TypeAdapter, ValidationError

from activities.models import MAX_PLAN_STEPS
from sandboxes.models import ServiceStep, Step, TerminalStep

# How a step plan begins; prose that happens to is refused by the API rather than guessed at.
STEP_PLAN = re.compile(r'\s*\{\s*"steps"\s*:')
STEPS: TypeAdapter[list[Step]] = TypeAdapter(list[Step])


# A ``$ `` line that is a service's start or stop, and what follows its colon.
SERVICE_LINE = re.compile(r"\$\s+service(-stop)?:\s*(.+)")


def user_plan(text: str, services: bool = True) -> list[Step] | None:
    """The steps of a prompt written as ``$ command`` lines, or None if it is prose. Without
    ``services``, a service line is a terminal command, as it was before they existed."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not all(line.startswith("$ ") for line in lines):
        return None
    return [_line_step(line, services) for line in lines]


def has_service_lines(text: str) -> bool:
    return any(SERVICE_LINE.fullmatch(line.strip()) for line in text.splitlines())


def _line_step(line: str, services: bool) -> Step:
    found = SERVICE_LINE.fullmatch(line) if services else None
    if found is None:
        return TerminalStep(command=line[2:].strip())
    if found[1]:
        return ServiceStep(action="stop", name=found[2].strip())
    return ServiceStep(command=found[2].strip())


def is_step_plan(text: str) -> bool:
    return STEP_PLAN.match(text) is not None


def step_plan(text: str) -> list[Step]:
    """The steps of a prompt written as ``{"steps": [...]}``; ValueError saying what is wrong
    with it if it is not a valid one."""
    try:
        written = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'a {{"steps": [...]}} plan is JSON: {exc}') from None
    if not isinstance(written, dict) or set(written) != {"steps"}:
        raise ValueError('a step plan is an object with "steps" only')
    try:
        steps = STEPS.validate_python(written["steps"])
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ValueError(f"a step plan's steps are invalid: {problems}") from None
    if not steps:
        raise ValueError("a step plan has at least one step")
    return steps


def check_plan_size(text: str) -> str:
    """``text``, or ValueError if it is a written plan longer than the cap, or a malformed
    step plan."""
    steps = step_plan(text) if is_step_plan(text) else user_plan(text)
    if steps is not None and len(steps) > MAX_PLAN_STEPS:
        raise ValueError(
            f"a plan has at most {MAX_PLAN_STEPS} steps; this one has {len(steps)}: "
            "split it into several tasks"
        )
    return text
