"""What a failed activity means to the session workflow: a step refused before it ran, a
sandbox whose machine is gone, and the words people are shown for any failure; and what
an update handler's own unexpected error becomes (a failed update, see ``answering``).

Pure functions of the exception Temporal hands the workflow (an ActivityError whose cause
is the activity's ApplicationError, typed by the name the activity gave it): deterministic,
so the workflow may call them anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, FailureError
from temporalio.exceptions import TimeoutError as TimedOut

Self = TypeVar("Self")
Argument = TypeVar("Argument")
Result = TypeVar("Result")

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


def unavailable(error: BaseException) -> bool:
    """Whether a step ran out of attempts without its guest (not connected, or lost and not
    back in time): its machine may be dead without its host having said so."""
    cause = error.cause if isinstance(error, ActivityError) else None
    return isinstance(cause, ApplicationError) and cause.type == "GuestUnavailable"


def timed_out(error: BaseException) -> bool:
    """Whether an activity's last attempt ran out of time: what it did may finish yet."""
    return isinstance(error, ActivityError) and isinstance(error.cause, TimedOut)


def failure_message(error: BaseException) -> str:
    """The innermost cause's message: what actually went wrong, for people."""
    while isinstance(error, ActivityError) and error.cause is not None:
        error = error.cause
    return str(error) or type(error).__name__


def answering(
    handler: Callable[[Self, Argument], Awaitable[Result]],
) -> Callable[[Self, Argument], Awaitable[Result]]:
    """An update handler whose unexpected error (a bug, a state it did not foresee) fails
    that update only. Left alone, the SDK fails the workflow task instead: the update is
    delivered again on every retry, fails again, and the session stops answering anything
    (even its end). A replay's non-determinism still fails the task: it is the worker's to
    fix, not the caller's."""

    @functools.wraps(handler)
    async def answer(self: Self, argument: Argument) -> Result:
        try:
            return await handler(self, argument)
        except (FailureError, workflow.NondeterminismError):
            raise  # already an update's failure, or the worker's own
        except Exception as exc:
            workflow.logger.exception("update %s failed unexpectedly", handler.__name__)
            raise ApplicationError(
                f"{handler.__name__} failed unexpectedly ({type(exc).__name__}: {exc}); "
                "the session goes on",
                type="UpdateFailed",
                non_retryable=True,
            ) from exc

    return answer
