"""Plans and verdicts through structured output: OpenAI's ``response_format`` json_schema
against a scripted server that answers only schema-constrained requests, Anthropic's forced
tool, JSON in text from a server without structured output, and the repair of a reply that
does not fit."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine
from temporalio.testing import ActivityEnvironment

from activities.models import PlanRequest, VerifyRequest
from activities.planning import PlanningActivities
from activities.replies import VERDICT_SCHEMA, parse_reply, plan_schema
from config.settings import LLMProvider, Settings
from llm.proxy import LLMProxy
from sandboxes.models import FileStep, TerminalStep
from tests.support.scripted_llm import Reply, ScriptedLLM

PLAN = {"steps": [
    {"kind": "file", "op": "write", "path": "hello.py", "content": "print('hi')\n",
     "command": None, "check": {"kind": "file_exists", "value": "hello.py"}},
    {"kind": "terminal", "command": "python3 hello.py", "op": None, "path": None,
     "content": None, "check": {"kind": "output_contains", "value": "hi"}},
]}  # fmt: skip
VERDICT = {"ok": True, "answer": "hi", "reason": "the script printed it"}


def planner(engine: Engine, server: ScriptedLLM, kind: str = "openai") -> PlanningActivities:
    base = server.url if kind == "anthropic" else f"{server.url}/v1"
    provider = LLMProvider.model_validate(
        {"name": "p", "kind": kind, "model": "m", "base_url": base, "api_key": "sk-test"}
    )
    return PlanningActivities(LLMProxy(Settings(llm_providers=[provider]), engine))


def by_schema(body: dict[str, Any]) -> str:
    """Schema-shaped content: the plan or the verdict, as the request's schema asks."""
    name = body["response_format"]["json_schema"]["name"]
    return json.dumps(PLAN if name == "plan" else VERDICT)


async def test_a_server_that_only_answers_schema_requests_plans_and_verifies(
    engine: Engine,
) -> None:
    with ScriptedLLM(script=by_schema, structured="required") as server:
        activities = planner(engine, server)
        plan = await ActivityEnvironment().run(
            activities.plan, PlanRequest(task_id="t", prompt="write a hello script and run it")
        )
        verdict = await ActivityEnvironment().run(
            activities.verify, VerifyRequest(task_id="t", prompt="write a hello script")
        )
    assert [s.kind for s in plan.steps] == ["file", "terminal"]
    assert plan.steps[1] == TerminalStep(
        command="python3 hello.py", check={"kind": "output_contains", "value": "hi"}
    )
    assert (verdict.ok, verdict.answer) == (True, "hi")
    asked = server.requests[0]["body"]["response_format"]
    assert asked["type"] == "json_schema" and asked["json_schema"]["strict"] is True
    schema = asked["json_schema"]["schema"]
    step = schema["properties"]["steps"]["items"]
    # Strict: every property required, none other allowed.
    assert step["additionalProperties"] is False
    assert set(step["required"]) == set(step["properties"])
    assert len(server.requests) == 2


async def test_anthropic_answers_through_a_forced_tool(engine: Engine) -> None:
    call = {"id": "toolu_1", "name": "plan", "arguments": json.dumps(PLAN)}
    with ScriptedLLM(Reply(tool_calls=[call])) as server:
        plan = await ActivityEnvironment().run(
            planner(engine, server, "anthropic").plan, PlanRequest(task_id="t", prompt="hello")
        )
    assert plan.steps[0] == FileStep(
        op="write", path="hello.py", content="print('hi')\n",
        check={"kind": "file_exists", "value": "hello.py"},
    )  # fmt: skip
    body = server.requests[0]["body"]
    assert server.requests[0]["path"].endswith("/messages")
    assert body["tool_choice"] == {"type": "tool", "name": "plan"}
    assert body["tools"][0]["input_schema"]["required"] == ["steps"]


async def test_a_server_without_structured_output_is_asked_for_json_in_text_once_known(
    engine: Engine,
) -> None:
    text = "Here is the plan:\n```json\n" + json.dumps(PLAN) + "\n```"
    with ScriptedLLM(default=text, structured="refused") as server:
        activities = planner(engine, server)
        first = await ActivityEnvironment().run(
            activities.plan, PlanRequest(task_id="t", prompt="one")
        )
        second = await ActivityEnvironment().run(
            activities.plan, PlanRequest(task_id="t", prompt="two")
        )
    assert len(first.steps) == len(second.steps) == 2
    asked = ["response_format" in r["body"] for r in server.requests]
    # Refused once with the schema, then asked without, and never with it again.
    assert asked == [True, False, False]


async def test_a_reply_that_does_not_fit_is_repaired_once_with_what_was_wrong(
    engine: Engine,
) -> None:
    bad = {"steps": [{"kind": "browser", "action": "click", "selector": None}]}
    with ScriptedLLM(json.dumps(bad), json.dumps(PLAN)) as server:
        plan = await ActivityEnvironment().run(
            planner(engine, server).plan, PlanRequest(task_id="t", prompt="click go")
        )
    assert len(plan.steps) == 2 and plan.usage.total_tokens == 30  # both replies counted
    messages = server.requests[1]["body"]["messages"]
    assert messages[-2] == {"role": "assistant", "content": json.dumps(bad)}
    assert "does not fit" in messages[-1]["content"]
    assert "browser action click needs selector" in messages[-1]["content"]


def test_a_strict_plan_with_every_field_null_where_it_does_not_apply_parses() -> None:
    step = plan_schema()["properties"]["steps"]["items"]
    full = dict.fromkeys(step["properties"])
    steps = [{**full, **s} for s in PLAN["steps"]]
    assert parse_reply(json.dumps({"steps": steps})) == parse_reply(json.dumps(PLAN))
    assert set(VERDICT_SCHEMA["required"]) == set(VERDICT)
