"""Planning: a prose task becomes steps, planned by the chat model named by BERTH_LLM_MODEL
through LangChain. (Plans written as ``$ `` lines never get here: the workflow parses them.)
"""

from __future__ import annotations

import json
import re

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import BaseModel, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from berth.settings import Settings
from sandboxes.models import Step, TerminalStep
from workflows.models import Plan, PlanRequest
from workflows.plans import MAX_PLAN_STEPS

NO_MODEL = (
    "This task needs a planner model, and none is configured. Set BERTH_LLM_MODEL "
    "(e.g. gpt-4o-mini with OPENAI_API_KEY, any model of an OpenAI-compatible server with "
    "OPENAI_BASE_URL, or claude-3-5-haiku-latest with ANTHROPIC_API_KEY), or write the "
    "steps yourself, one per line, each starting with '$ '."
)

SYSTEM_PROMPT = """\
You plan the work of an autonomous agent that acts in a Debian Linux sandbox through a bash
terminal, one command per step. Turn the user's task into the shortest sequence of shell
commands that does it and shows the result. Each command runs non-interactively in a fresh
bash in the home directory; a step fails the task if it exits non-zero.
Reply with one JSON object and nothing else: {"steps": [{"command": "..."}]}"""


def chat_model(settings: Settings) -> BaseChatModel | None:
    """The configured chat model: ``openai:NAME``, ``anthropic:NAME``, or a bare name
    (``claude-*`` means Anthropic, anything else an OpenAI-compatible server)."""
    if not settings.llm_model:
        return None
    provider, _, name = settings.llm_model.rpartition(":")
    provider = provider or ("anthropic" if name.startswith("claude") else "openai")
    if provider == "anthropic":
        from langchain_anthropic import ChatAnthropic

        return ChatAnthropic(  # type: ignore[call-arg]
            model_name=name, api_key=settings.anthropic_api_key, timeout=60, max_retries=1
        )
    if provider == "openai":
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(
            model=name,
            api_key=settings.openai_api_key or "not-needed",  # local servers take any key
            base_url=settings.openai_base_url,
            timeout=60,
            max_retries=1,
            temperature=0,
        )
    raise ValueError(f"BERTH_LLM_MODEL: unknown provider {provider!r} (use openai: or anthropic:)")


class _Reply(BaseModel):
    class _Command(BaseModel):
        command: str

    steps: list[_Command]


def parse_reply(text: str) -> list[Step]:
    """The steps in a model's reply: its first JSON object, fenced in markdown or not."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match is None:
        raise ValueError(f"the planner's reply holds no JSON object: {text[:300]!r}")
    try:
        reply = _Reply.model_validate(json.loads(match.group(0)))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"the planner's reply is not a plan: {exc}") from exc
    steps: list[Step] = [
        TerminalStep(command=s.command.strip()) for s in reply.steps if s.command.strip()
    ]
    if not steps:
        raise ValueError("the planner returned no steps")
    return steps[:MAX_PLAN_STEPS]


def planner_messages(request: PlanRequest) -> list[SystemMessage | HumanMessage]:
    text = f"Task:\n{request.prompt}"
    if request.done:
        text += "\n\nSteps already run:\n" + "\n".join(
            f"{d.step.describe()}\n(exit {d.outcome.exit_code}) {d.outcome.output_tail[-800:]}"
            for d in request.done
        )
    if request.instruction:
        text += (
            f"\n\nThe user changed the task: {request.instruction}\n"
            "Plan only the steps still to run."
        )
    return [SystemMessage(SYSTEM_PROMPT), HumanMessage(text)]


class PlanningActivities:
    def __init__(self, model: BaseChatModel | None) -> None:
        self.model = model

    @activity.defn(name="PlanTask")
    async def plan(self, request: PlanRequest) -> Plan:
        if self.model is None:
            raise ApplicationError(NO_MODEL, type="NoPlannerModel", non_retryable=True)
        reply = await self.model.ainvoke(planner_messages(request))
        try:
            return Plan(steps=parse_reply(str(reply.content)))
        except ValueError as exc:
            raise ApplicationError(str(exc), type="BadPlan") from exc
