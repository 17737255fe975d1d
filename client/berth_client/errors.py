"""Errors: every answer the API refuses becomes a ``ProblemError`` of its status's class,
carrying the problem document the server sent."""

from __future__ import annotations

import httpx
from pydantic import ValidationError

from berth_client.models import Problem, TaskOut


class BerthError(Exception):
    """Anything this client raises."""


class ProblemError(BerthError):
    """The API said no; ``problem`` is its document (``detail`` says why)."""

    def __init__(self, problem: Problem, retry_after: float | None = None) -> None:
        super().__init__(f"{problem.status} {problem.title}: {problem.detail}")
        self.problem = problem
        self.status = problem.status
        self.detail = problem.detail
        self.retry_after = retry_after


class InvalidRequest(ProblemError):
    """400 or 422: the request's input (``problem.errors`` says where)."""


class Unauthorized(ProblemError):
    """401: no token, or a wrong, expired or revoked one (``berth login``)."""


class Forbidden(ProblemError):
    """403."""


class NotFound(ProblemError):
    """404: no such session, task or artifact (or not the caller's)."""


class Conflict(ProblemError):
    """409: not now (the session ended, the task is not paused, ...)."""


class RateLimited(ProblemError):
    """429: too many sessions, streams or logins; ``retry_after`` when the server said."""


class Unavailable(ProblemError):
    """502, 503 or 504: the orchestrator or the session's host does not answer."""


class ServerError(ProblemError):
    """Another 5xx: the server failed (``problem.error_id`` finds it in its log)."""


class TaskFailed(BerthError):
    """A task ended without succeeding; ``task`` is how it ended."""

    def __init__(self, task: TaskOut) -> None:
        super().__init__(f"task {task.id} {task.status}: {task.error or 'no reason given'}")
        self.task = task


class StreamLost(BerthError):
    """The event stream could not be reconnected."""


BY_STATUS: dict[int, type[ProblemError]] = {
    400: InvalidRequest,
    422: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def from_response(response: httpx.Response) -> ProblemError:
    """The error of a refused answer (its body read): its problem document, or one made up
    from the status when the body is not one (a proxy's page)."""
    try:
        problem = Problem.model_validate_json(response.content)
    except ValidationError:
        text = response.text.strip()[:200] or response.reason_phrase
        problem = Problem(title=response.reason_phrase, status=response.status_code, detail=text)
    kind = BY_STATUS.get(response.status_code)
    if kind is None:
        kind = ServerError if response.status_code >= 500 else ProblemError
    return kind(problem, retry_after(response))


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
