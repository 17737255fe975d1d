"""What a failed activity means to the session workflow: a step refused before it ran, a
sandbox whose machine is gone, and the words people are shown for any failure.

Pure functions of the exception Temporal hands the workflow (an ActivityError whose cause
is the activity's ApplicationError, typed by the name the activity gave it): deterministic,
so the workflow may call them anywhere.
"""

from __future__ import annotations

from temporalio.exceptions import ActivityError, ApplicationError

# Failures of a step that mean it never ran; the agent plans around them.
REFUSALS = ("CommandRefused", "StepKindUnsupported")
# The exit status a shell gives a command it cannot run: a refused step's, for the agent.
REFUSED_EXIT = 126


def refused(error: BaseException) -> str | None:
    """Why a step was refused before it ran (a command its template's policy forbids, a
    kind of step its guest cannot do), or None for any other failure."""
    cause = error.cause if isinstance(error, ActivityError) else None
    if isinstance(cause, ApplicationError) and cause.type in REFUSALS:
        return cause.message
    return None


def died(error: BaseException) -> bool:
    """Whether a step failed because its sandbox's machine is gone."""
    cause = error.cause if isinstance(error, ActivityError) else None
    return isinstance(cause, ApplicationError) and cause.type == "SandboxDied"


def failure_message(error: BaseException) -> str:
    """The innermost cause's message: what actually went wrong, for people."""
    while isinstance(error, ActivityError) and error.cause is not None:
        error = error.cause
    return str(error) or type(error).__name__
