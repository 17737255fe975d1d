"""Planning: a prose task becomes steps, planned by the configured models through the LLM
proxy (cache, fallback, accounting). (Plans written as ``$ `` lines never get here: the
workflow parses them.)
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from llm.accounting import caller_for_session
from llm.models import (
    AllProvidersFailed,
    BudgetExceeded,
    ChatRequest,
    InvalidRequest,
    LLMError,
    NoProvider,
    RateLimited,
)
from llm.proxy import LLMProxy
from sandboxes.models import TerminalStep
from workflows.models import Plan, PlanRequest
from workflows.plans import MAX_PLAN_STEPS

NO_MODEL = (
    "This task needs a planner model, and none is configured. Set BERTH_LLM_MODEL "
    "(e.g. gpt-4o-mini with OPENAI_API_KEY, any model of an OpenAI-compatible server with "
    "OPENAI_BASE_URL, or claude-3-5-haiku-latest with ANTHROPIC_API_KEY) or BERTH_LLM_PROVIDERS, "
    "or write the steps yourself, one per line, each starting with '$ '."
)
# The proxy's errors as the activity's: (error type, whether a retry may help).
FAILURES: dict[type[LLMError], tuple[str, bool]] = {
    NoProvider: ("NoPlannerModel", False),
    BudgetExceeded: ("LLMBudgetExceeded", False),
    InvalidRequest: ("LLMInvalidRequest", False),
    RateLimited: ("LLMRateLimited", True),
    AllProvidersFailed: ("LLMUnavailable", True),
}

SYSTEM_PROMPT = """\
You plan the work of an autonomous agent that acts in a Debian Linux sandbox through a bash
terminal, one command per step. Turn the user's task into the shortest sequence of shell
commands that does it and shows the result. Each command runs non-interactively in a fresh
bash in the home directory; a step fails the task if it exits non-zero.
Reply with one JSON object and nothing else: {"steps": [{"command": "..."}]}"""


class _Reply(BaseModel):
    class _Command(BaseModel):
        command: str

    steps: list[_Command]


def parse_reply(text: str) -> list[TerminalStep]:
    """The steps in a model's reply: its first JSON object, fenced in markdown or not."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match is None:
        raise ValueError(f"the planner's reply holds no JSON object: {text[:300]!r}")
    try:
        reply = _Reply.model_validate(json.loads(match.group(0)))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"the planner's reply is not a plan: {exc}") from exc
    steps = [TerminalStep(command=s.command.strip()) for s in reply.steps if s.command.strip()]
    if not steps:
        raise ValueError("the planner returned no steps")
    return steps[:MAX_PLAN_STEPS]


def planner_messages(request: PlanRequest) -> list[dict[str, Any]]:
    text = f"Task:\n{request.prompt}"
    if request.done:
        text += "\n\nSteps already run:\n" + "\n".join(
            f"$ {d.step.command}\n(exit {d.outcome.exit_code}) {d.outcome.output_tail[-800:]}"
            for d in request.done
        )
    if request.instruction:
        text += (
            f"\n\nThe user changed the task: {request.instruction}\n"
            "Plan only the steps still to run."
        )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]


class PlanningActivities:
    def __init__(self, proxy: LLMProxy) -> None:
        self.proxy = proxy

    @activity.defn(name="PlanTask")
    async def plan(self, request: PlanRequest) -> Plan:
        if not self.proxy.configured:
            raise ApplicationError(NO_MODEL, type="NoPlannerModel", non_retryable=True)
        caller = await asyncio.to_thread(
            caller_for_session, self.proxy.engine, request.session_id, request.task_id
        )
        chat = ChatRequest(messages=planner_messages(request), temperature=0)
        # A retry follows a reply that was no plan: ask again rather than read it back.
        cache = None if activity.info().attempt == 1 else False
        try:
            result = await self.proxy.complete(chat, caller, cache=cache)
        except LLMError as exc:
            kind, retryable = next(v for k, v in FAILURES.items() if isinstance(exc, k))
            message = NO_MODEL if isinstance(exc, NoProvider) else str(exc)
            raise ApplicationError(message, type=kind, non_retryable=not retryable) from exc
        try:
            steps = parse_reply(result.message.get("content") or "")
        except ValueError as exc:
            raise ApplicationError(str(exc), type="BadPlan") from exc
        return Plan(
            steps=steps,
            provider=result.provider,
            model=result.model,
            cached=result.cached,
            usage=result.usage,
        )
