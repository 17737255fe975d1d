"""Requests, results and errors of the LLM proxy, in the OpenAI chat-completions shape.

Plain Pydantic: the workflow's models import ``TokenUsage``, so nothing heavy is imported here.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class Caller(BaseModel):
    """Who a call is for: accounting and limits are kept per user, session and task."""

    user_id: str
    session_id: str | None = None
    task_id: str | None = None


class ChatRequest(BaseModel):
    """An OpenAI chat-completions request; other OpenAI fields are kept as extras."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    temperature: float | None = None
    max_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    stream: bool = False


class TokenUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0


class ChatResult(BaseModel):
    # {"role": "assistant", "content": str | None, "tool_calls": [...]} as OpenAI has it
    message: dict[str, Any]
    finish_reason: str | None
    provider: str
    model: str
    usage: TokenUsage
    cached: bool = False


class LLMError(Exception):
    """Base of the proxy's errors; the message is meant for the user."""


class NoProvider(LLMError):
    """No provider is configured."""


class InvalidRequest(LLMError):
    """The request itself is wrong (unknown model, or a provider refused it as malformed)."""


class AllProvidersFailed(LLMError):
    """Every provider was tried; the message names each and why it failed."""


class RateLimited(LLMError):
    """The user made more requests in the last minute than the limit allows, or has as many
    calls in flight as they may; ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetExceeded(LLMError):
    """The task has spent its token budget."""


class SpendLimited(BudgetExceeded):
    """The user has spent their LLM budget of a day or a month: ``limit`` names it (the
    setting), ``value`` is it in USD, ``spent`` what is spent (calls in flight reckoned at
    their most), and ``resets_at`` when its period ends."""

    def __init__(self, limit: str, value: float, spent: float, resets_at: datetime) -> None:
        period = "day (UTC)" if limit == "spend_day_usd" else "calendar month (UTC)"
        super().__init__(
            f"spend limit: ${spent:.2f} of LLM calls spent this {period}, the limit "
            f"(BERTH_{limit.upper()}) is ${value:.2f}; it resets at "
            f"{resets_at.isoformat().replace('+00:00', 'Z')}"
        )
        self.limit = limit
        self.value = value
        self.spent = spent
        self.resets_at = resets_at

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil((self.resets_at - datetime.now(UTC)).total_seconds()))


class UsageTotals(BaseModel):
    """LLM calls summed: tokens and cost are what providers spent (a cache hit spends none)."""

    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0


class SessionUsage(UsageTotals):
    session_id: str


class TaskUsage(UsageTotals):
    session_id: str | None
    task_id: str


class UserUsage(BaseModel):
    user_id: str
    total: UsageTotals
    sessions: list[SessionUsage]
    tasks: list[TaskUsage]
