"""Planning: a prose task becomes steps, planned by the chat model named by BERTH_LLM_MODEL
through LangChain. (Plans written as ``$ `` lines never get here: the workflow parses them.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

import vm_templates
from activities.context import Messages, fit, progress
from activities.models import (
    ModelAnswer,
    Plan,
    PlanRequest,
    TaskVerdict,
    VerifyRequest,
)
from activities.prompts import VERIFY_PROMPT, planner_prompt, step_kinds
from activities.replies import (
    PLAN_SCHEMA_NAME,
    VERDICT_SCHEMA,
    VERDICT_SCHEMA_NAME,
    parse_reply,
    parse_verdict,
    plan_schema,
)
from llm.accounting import caller_for_session
from llm.models import (
    AllProvidersFailed,
    BudgetExceeded,
    ChatRequest,
    ChatResult,
    InvalidRequest,
    LLMError,
    NoProvider,
    RateLimited,
    TokenUsage,
)
from llm.proxy import LLMProxy
from llm.structured import json_schema_format
from sandboxes.policy import CommandPolicy, load_policy
from store.models import SessionRow

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


def session_template(engine: Engine, session_id: str) -> str:
    """The session's sandbox template (the default one for a call outside a session)."""
    with Session(engine) as db:
        row = db.get(SessionRow, session_id) if session_id else None
    return row.template if row is not None else vm_templates.DEFAULT


T = TypeVar("T")


def planner_messages(request: PlanRequest, system: str, text: str) -> Messages:
    """The planner's messages, ``text`` the task's progress."""
    if request.feedback:
        text += f"\n\nThe plan must change: {request.feedback}"
    if request.done or request.feedback or request.instruction:
        text += "\nPlan only the steps still to run."
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def verifier_messages(text: str) -> Messages:
    return [{"role": "system", "content": VERIFY_PROMPT}, {"role": "user", "content": text}]


REPAIR = """\
Your reply does not fit the required JSON schema:
{problems}
Reply again with the whole corrected JSON object and nothing else."""


def answer(*results: ChatResult) -> dict[str, Any]:
    """Who answered (the last reply) and what the replies cost together, as a ModelAnswer's
    fields."""
    last = results[-1]
    usage = TokenUsage()
    for result in results:
        for field in TokenUsage.model_fields:
            setattr(usage, field, getattr(usage, field) + getattr(result.usage, field))
    return dict(
        ModelAnswer(
            provider=last.provider,
            model=last.model,
            cached=all(r.cached for r in results),
            usage=usage,
        )
    )


class PlanningActivities:
    """Every model call of the agent loop, through the LLM proxy (cache, fallback,
    accounting against the session's user and the task)."""

    def __init__(self, proxy: LLMProxy) -> None:
        self.proxy = proxy
        self.policies: dict[str, CommandPolicy] = {}  # by template, read once per worker

    def sandbox(self, template: str) -> tuple[str, tuple[str, ...]]:
        """The planner's system prompt for a session of ``template``, and its step kinds."""
        if template not in self.policies:
            self.policies[template] = load_policy(template, self.proxy.settings.command_policy_path)
        return planner_prompt(template, self.policies[template]), step_kinds(template)

    def bounded(
        self, request: PlanRequest | VerifyRequest, messages: Callable[[str], Messages]
    ) -> Messages:
        """The call's messages within the context window of every provider it may go to."""
        if not self.proxy.configured:
            return messages(progress(request))
        return fit(request, messages, self.proxy.count_tokens, self.proxy.prompt_budget())

    async def ask(
        self,
        messages: Messages,
        request: PlanRequest | VerifyRequest,
        schema: tuple[str, dict[str, Any]],
        parse: Callable[[str], T],
        unparsed: str,
    ) -> tuple[T, dict[str, Any]]:
        """The model's reply to ``messages``, held to ``schema`` (name, JSON schema) and
        parsed, and who answered. A reply that does not fit is sent back once with what is
        wrong in it; a second that does not is an error of type ``unparsed``, which the
        activity's retry asks again."""
        if not self.proxy.configured:
            raise ApplicationError(NO_MODEL, type="NoPlannerModel", non_retryable=True)
        caller = await asyncio.to_thread(
            caller_for_session, self.proxy.engine, request.session_id, request.task_id
        )

        def parsed(result: ChatResult) -> T:
            return parse(result.message.get("content") or "")

        def usable(result: ChatResult) -> bool:
            try:
                parsed(result)
            except ValueError:
                return False
            return True

        async def complete(chat_messages: Messages) -> ChatResult:
            chat = ChatRequest(
                messages=chat_messages, temperature=0, response_format=json_schema_format(*schema)
            )
            try:
                # Only a reply that parses is cached: a retry asks the model again.
                return await self.proxy.complete(chat, caller, keep=usable, prefer=request.model)
            except LLMError as exc:
                kind, retryable = next(v for k, v in FAILURES.items() if isinstance(exc, k))
                message = NO_MODEL if isinstance(exc, NoProvider) else str(exc)
                raise ApplicationError(message, type=kind, non_retryable=not retryable) from exc

        first = await complete(messages)
        try:
            return parsed(first), answer(first)
        except ValueError as exc:
            wrong = str(exc)
        activity.logger.info("the model's reply does not fit; asking it to repair: %s", wrong)
        repair = [
            *messages,
            {"role": "assistant", "content": first.message.get("content") or ""},
            {"role": "user", "content": REPAIR.format(problems=wrong)},
        ]
        second = await complete(repair)
        try:
            return parsed(second), answer(first, second)
        except ValueError as exc:
            raise ApplicationError(str(exc), type=unparsed) from exc

    @activity.defn(name="PlanTask")
    async def plan(self, request: PlanRequest) -> Plan:
        template = await asyncio.to_thread(session_template, self.proxy.engine, request.session_id)
        system, kinds = self.sandbox(template)
        messages = self.bounded(request, lambda text: planner_messages(request, system, text))
        steps, by = await self.ask(
            messages,
            request,
            (PLAN_SCHEMA_NAME, plan_schema(kinds)),
            parse_reply,
            "BadPlan",
        )
        return Plan(steps=steps, **by)

    @activity.defn(name="VerifyTask")
    async def verify(self, request: VerifyRequest) -> TaskVerdict:
        verdict, by = await self.ask(
            self.bounded(request, verifier_messages),
            request,
            (VERDICT_SCHEMA_NAME, VERDICT_SCHEMA),
            parse_verdict,
            "BadVerdict",
        )
        return TaskVerdict(ok=verdict.ok, answer=verdict.answer, reason=verdict.reason, **by)
