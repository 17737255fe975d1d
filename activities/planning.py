"""Planning: a prose task becomes steps, planned by the chat model named by BERTH_LLM_MODEL
through LangChain. (Plans written as ``$ `` lines never get here: the workflow parses them.)
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError, field_validator
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.models import (
    MAX_PLAN_STEPS,
    DoneStep,
    ModelAnswer,
    Plan,
    PlanRequest,
    TaskVerdict,
    VerifyRequest,
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
)
from llm.proxy import LLMProxy
from sandboxes.models import Step

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
You plan the work of an autonomous agent that acts in a Debian Linux sandbox, one step at a
time. Turn the user's task into the shortest sequence of steps that does it and shows the
result. Steps, as JSON objects:
- {"kind": "terminal", "command": "..."}: one command, run non-interactively by bash in the
  workspace (the home directory).
- {"kind": "file", "op": "write", "path": "...", "content": "..."}, or op "read" or "list":
  a file in the workspace. Write scripts as files, then run them.
- {"kind": "browser", "action": "navigate", "url": "https://..."}; other actions: "click"
  (selector), "type" (selector, text), "select" (selector, value), "extract" (text of
  selector, or of the page), "wait_for" (selector or text), "screenshot". One browser page
  is kept across the task's steps; every browser step takes a screenshot.
- {"kind": "service", "command": "..."}: start a long-running command (a web server) that
  keeps running after the step, its output kept; the step's output names it (s1, ...), and
  {"kind": "service", "action": "stop", "name": "s1"} stops it. Never start one with `&`.
Give each step a success criterion, checked right after it runs, as "check":
{"kind": "exit_code", "value": "0"}, {"kind": "output_contains", "value": "TEXT"},
{"kind": "output_regex", "value": "REGEX"}, {"kind": "file_exists", "value": "PATH"}, or for
browser steps {"kind": "url_matches", "value": "REGEX"} or
{"kind": "page_text_contains", "value": "TEXT"}.
Steps run in order; if one fails or misses its check, you are told what happened and plan
the rest again. The sandbox's policy refuses some commands (inline code such as
`python3 -c` or `bash -c`, eval, command substitution, sudo): write a file and run it.
If the steps already run achieve the task, plan no steps.
Reply with one JSON object and nothing else: {"steps": [...]}"""

VERIFY_PROMPT = """\
You check the work of an autonomous agent against the user's task. You are given the task
and the steps the agent ran with their output. Decide whether the task is done, and write the
answer the user gets: the result itself (quote the output that matters), not a description
of the steps. Reply with one JSON object and nothing else:
{"ok": true or false, "answer": "...", "reason": "why it is or is not done"}"""


class _Reply(BaseModel):
    steps: list[Step]

    @field_validator("steps", mode="before")
    @classmethod
    def _terminal_by_default(cls, steps: Any) -> Any:
        # Models often leave out the kind of a plain command.
        if isinstance(steps, list):
            return [
                {"kind": "terminal", **s} if isinstance(s, dict) and "kind" not in s else s
                for s in steps
            ]
        return steps


def json_object(text: str) -> Any:
    """A model's reply's first JSON object, fenced in markdown or not."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match is None:
        raise ValueError(f"the reply holds no JSON object: {text[:300]!r}")
    try:
        return json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply's JSON does not parse: {exc}") from exc


def parse_reply(text: str) -> list[Step]:
    """The steps in a planner's reply (none when it finds the task done already)."""
    try:
        reply = _Reply.model_validate(json_object(text))
    except ValidationError as exc:
        raise ValueError(f"the planner's reply is not a plan: {exc}") from exc
    return reply.steps[:MAX_PLAN_STEPS]


def parse_verdict(text: str) -> TaskVerdict:
    try:
        return TaskVerdict.model_validate(json_object(text))
    except ValidationError as exc:
        raise ValueError(f"the verifier's reply is not a verdict: {exc}") from exc


def progress(request: PlanRequest | VerifyRequest) -> str:
    """The task as the model sees it: the goal, the user's changes, what ran and how."""
    text = f"Task:\n{request.prompt}"
    if request.notes:
        text += "\n\nThe user changed the task:\n" + "\n".join(f"- {n}" for n in request.notes)
    if request.done:
        text += "\n\nSteps run so far, oldest first:\n" + "\n".join(
            done_step(d) for d in request.done
        )
    return text


def done_step(done: DoneStep) -> str:
    outcome = done.outcome
    lines = [done.step.describe(), "-> ok" if outcome.ok else f"-> {outcome.problem()}"]
    if outcome.check is not None and outcome.check.ok:
        lines.append(f"check: {outcome.check.detail}")
    if outcome.result is not None:
        found = outcome.result.model_dump(exclude_none=True)
        lines += [f"{name}: {value[:800] if isinstance(value, str) else value}"
                  for name, value in found.items()]  # fmt: skip
    if outcome.output_tail:
        lines.append(f"output: {outcome.output_tail[-800:]}")
    return "\n".join(lines)


Messages = list[dict[str, Any]]
T = TypeVar("T")


def planner_messages(request: PlanRequest) -> Messages:
    text = progress(request)
    if request.feedback:
        text += f"\n\nThe plan must change: {request.feedback}"
    if request.done or request.feedback or request.instruction:
        text += "\nPlan only the steps still to run."
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]


def verifier_messages(request: VerifyRequest) -> Messages:
    return [
        {"role": "system", "content": VERIFY_PROMPT},
        {"role": "user", "content": progress(request)},
    ]


def answer(result: ChatResult) -> dict[str, Any]:
    """Who answered and what it cost, as a ModelAnswer's fields."""
    return dict(
        ModelAnswer(
            provider=result.provider, model=result.model, cached=result.cached, usage=result.usage
        )
    )


class PlanningActivities:
    """Every model call of the agent loop, through the LLM proxy (cache, fallback,
    accounting against the session's user and the task)."""

    def __init__(self, proxy: LLMProxy) -> None:
        self.proxy = proxy

    async def ask(
        self,
        messages: Messages,
        request: PlanRequest | VerifyRequest,
        parse: Callable[[str], T],
        unparsed: str,
    ) -> tuple[T, dict[str, Any]]:
        """The model's reply to ``messages``, parsed, and who answered; a reply that does not
        parse is an error of type ``unparsed``, which a retry asks again."""
        if not self.proxy.configured:
            raise ApplicationError(NO_MODEL, type="NoPlannerModel", non_retryable=True)
        caller = await asyncio.to_thread(
            caller_for_session, self.proxy.engine, request.session_id, request.task_id
        )
        chat = ChatRequest(messages=messages, temperature=0)

        def parsed(result: ChatResult) -> T:
            return parse(result.message.get("content") or "")

        def usable(result: ChatResult) -> bool:
            try:
                parsed(result)
            except ValueError:
                return False
            return True

        try:
            # Only a reply that parses is cached: a retry asks the model again.
            result = await self.proxy.complete(chat, caller, keep=usable, prefer=request.model)
        except LLMError as exc:
            kind, retryable = next(v for k, v in FAILURES.items() if isinstance(exc, k))
            message = NO_MODEL if isinstance(exc, NoProvider) else str(exc)
            raise ApplicationError(message, type=kind, non_retryable=not retryable) from exc
        try:
            return parsed(result), answer(result)
        except ValueError as exc:
            raise ApplicationError(str(exc), type=unparsed) from exc

    @activity.defn(name="PlanTask")
    async def plan(self, request: PlanRequest) -> Plan:
        steps, by = await self.ask(planner_messages(request), request, parse_reply, "BadPlan")
        return Plan(steps=steps, **by)

    @activity.defn(name="VerifyTask")
    async def verify(self, request: VerifyRequest) -> TaskVerdict:
        verdict, by = await self.ask(
            verifier_messages(request), request, parse_verdict, "BadVerdict"
        )
        return TaskVerdict(ok=verdict.ok, answer=verdict.answer, reason=verdict.reason, **by)
