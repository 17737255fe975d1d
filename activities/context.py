"""What the model is told of a task's progress, kept within its context window.

Each planning or verifying call carries the task, the user's changes and the steps run so
far. Counted against the call's budget (llm/tokens.py), the oldest steps are summarized, one
line each, once the whole nears it, and steps' outputs are cut shorter: deterministically,
without a model call, so a replayed or retried call is told the same. A long output is kept as
its head and its tail, with the lines between that matter to the step's check.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from activities.models import DoneStep, PlanRequest, VerifyRequest
from sandboxes.models import Check

Messages = list[dict[str, Any]]
# A step's output shown in full at most this long; shorter when the budget is near.
OUTPUT_CHARS = (1500, 400)
# The share of the budget the context may fill before it is cut.
NEAR = 0.8
# Steps always shown in full, whatever the budget: the latest, which the next plan follows.
KEEP_FULL = 2
# What is kept of a long output: a head, a tail, and (between) lines the check looks for.
HEAD_SHARE = 0.25
MATCHED_LINES = 8


def matters(line: str, check: Check | None) -> bool:
    """Whether an output line is one the step's check looks for."""
    if check is None:
        return False
    if check.kind == "output_contains":
        return check.value in line
    if check.kind == "output_regex":
        return re.search(check.value, line) is not None
    return False


def excerpt(output: str, check: Check | None, most: int) -> str:
    """``output`` if it is short; else its head and tail, with the lines that matter to the
    check found between them."""
    if len(output) <= most:
        return output
    head = output[: int(most * HEAD_SHARE)]
    tail = output[-(most - len(head)) :]
    middle = output[len(head) : len(output) - len(tail)]
    found = [line for line in middle.splitlines() if matters(line, check)][:MATCHED_LINES]
    cut = f"[... {len(middle)} characters cut ...]"
    if found:
        cut = f"[... {len(middle)} characters cut; the lines the check looks for:]\n"
        cut += "\n".join(found) + "\n[...]"
    return f"{head}\n{cut}\n{tail}"


def step_in_full(done: DoneStep, output_chars: int) -> str:
    outcome = done.outcome
    lines = [done.step.describe(), "-> ok" if outcome.ok else f"-> {outcome.problem()}"]
    if outcome.check is not None and outcome.check.ok:
        lines.append(f"check: {outcome.check.detail}")
    if outcome.result is not None:
        found = outcome.result.model_dump(exclude_none=True)
        lines += [
            f"{name}: {excerpt(value, None, output_chars) if isinstance(value, str) else value}"
            for name, value in found.items()
        ]
    if outcome.output_tail:
        lines.append(f"output: {excerpt(outcome.output_tail, done.step.check, output_chars)}")
    return "\n".join(lines)


def step_in_brief(done: DoneStep) -> str:
    """One line: what ran and how it ended."""
    outcome = done.outcome
    ended = "ok" if outcome.ok else outcome.problem().splitlines()[0][:160]
    return f"- {done.step.describe()[:160]} -> {ended}"


def progress(request: PlanRequest | VerifyRequest, brief: int = 0, output_chars: int = 0) -> str:
    """The task as the model sees it: the goal, the user's changes, what ran and how; the
    ``brief`` oldest steps in a line each, the others' outputs cut to ``output_chars``."""
    text = f"Task:\n{request.prompt}"
    if request.notes:
        text += "\n\nThe user changed the task:\n" + "\n".join(f"- {n}" for n in request.notes)
    done = request.done
    if done[:brief]:
        text += "\n\nEarlier steps, in brief, oldest first:\n" + "\n".join(
            step_in_brief(d) for d in done[:brief]
        )
    if done[brief:]:
        title = "Then these steps" if brief else "Steps run so far, oldest first"
        text += f"\n\n{title}:\n" + "\n".join(
            step_in_full(d, output_chars or OUTPUT_CHARS[0]) for d in done[brief:]
        )
    return text


def fit(
    request: PlanRequest | VerifyRequest,
    messages: Callable[[str], Messages],
    count: Callable[[Messages], int],
    budget: int,
) -> Messages:
    """The call's messages (``messages`` of the progress text) at the most detail that fits
    well within ``budget`` tokens: first with outputs cut shorter, then with the oldest
    steps summarized one by one (the latest KEEP_FULL never); the least detailed if none
    does."""
    most = max(len(request.done) - KEEP_FULL, 0)
    tries = [(brief, chars) for brief in range(most + 1) for chars in OUTPUT_CHARS]
    chosen: Messages = []
    for brief, chars in tries:
        chosen = messages(progress(request, brief, chars))
        if count(chosen) <= budget * NEAR:
            break
    return chosen
