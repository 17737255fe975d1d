"""Plans written by hand: a prompt whose every non-empty line starts with ``$ `` is a plan
already, one terminal step per line. Pure functions, so the workflow parses such a plan
itself (no activity, no history events) and the API refuses an oversized one up front."""

from __future__ import annotations

from activities.models import MAX_PLAN_STEPS
from sandboxes.models import Step, TerminalStep


def user_plan(text: str) -> list[Step] | None:
    """The steps of a prompt written as ``$ command`` lines, or None if it is prose."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not all(line.startswith("$ ") for line in lines):
        return None
    return [TerminalStep(command=line[2:].strip()) for line in lines]


def check_plan_size(text: str) -> str:
    """``text``, or ValueError if it is a written plan longer than the cap."""
    steps = user_plan(text)
    if steps is not None and len(steps) > MAX_PLAN_STEPS:
        raise ValueError(
            f"a plan has at most {MAX_PLAN_STEPS} steps; this one has {len(steps)}: "
            "split it into several tasks"
        )
    return text
