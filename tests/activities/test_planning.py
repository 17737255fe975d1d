"""Planning: user-written plans, and the planner through the LLM proxy against scripted
OpenAI-compatible servers on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.models import BRIEF_CHARS, MAX_PLAN_STEPS, DoneStep, PlanRequest, VerifyRequest
from activities.planning import PlanningActivities
from activities.replies import parse_reply
from config.settings import LLMProvider, Settings
from llm.proxy import LLMProxy
from sandboxes.models import FileStep, StepOutcome, StepResult, TerminalStep
from tests.support.scripted_llm import Reply, ScriptedLLM
from workflows.plans import check_plan_size, is_step_plan, step_plan, user_plan


@pytest.fixture
def llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as server:
        yield server


def planner_for(engine: Engine, *servers: ScriptedLLM, **settings: Any) -> PlanningActivities:
    """A planner whose proxy has one provider per server, in order."""
    providers = [
        LLMProvider(name=f"p{i}", model="test-model", base_url=f"{s.url}/v1", api_key="sk-test")
        for i, s in enumerate(servers)
    ]
    defaults: dict[str, Any] = {"llm_backoff_s": 0.01}
    return PlanningActivities(
        LLMProxy(Settings(llm_providers=providers, **defaults | settings), engine)
    )


def test_dollar_lines_are_a_plan_and_prose_is_not() -> None:
    steps = user_plan("$ echo hello && uname -a\n\n  $ ls -la /  \n")
    assert steps is not None
    assert [s.describe() for s in steps] == ["$ echo hello && uname -a", "$ ls -la /"]
    assert user_plan("list the files\n$ ls") is None
    assert user_plan("   ") is None


def test_a_json_step_plan_is_a_plan_of_any_kind_and_a_malformed_one_is_refused() -> None:
    text = json.dumps({"steps": [
        {"kind": "file", "op": "read", "path": "notes.txt"},
        {"kind": "browser", "action": "click", "selector": "#go"},
    ]})  # fmt: skip
    assert is_step_plan(text) and check_plan_size(text) == text
    assert [s.describe() for s in step_plan(text)] == ["read notes.txt", "click #go"]
    assert not is_step_plan('{"goal": "x"}') and not is_step_plan("tell me about {steps}")
    for bad, why in [
        ('{"steps": [', "is JSON"),
        ('{"steps": [], "more": 1}', '"steps" only'),
        ('{"steps": []}', "at least one step"),
        ('{"steps": [{"kind": "browser", "action": "click"}]}', "needs selector"),
        ('{"steps": [{"kind": "rocket"}]}', "steps are invalid"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_plan_size(bad)
    many = json.dumps({"steps": [{"kind": "terminal", "command": "true"}] * (MAX_PLAN_STEPS + 1)})
    with pytest.raises(ValueError, match=f"at most {MAX_PLAN_STEPS} steps"):
        check_plan_size(many)


def test_a_written_plan_is_capped() -> None:
    fifty = "\n".join(["$ true"] * MAX_PLAN_STEPS)
    assert check_plan_size(fifty) == fifty
    with pytest.raises(ValueError, match=f"at most {MAX_PLAN_STEPS} steps; this one has 51"):
        check_plan_size(fifty + "\n$ true")
    assert check_plan_size("prose " * 1000)  # prose is the planner's to cap


def test_replies_are_parsed_with_or_without_fences() -> None:
    fenced = 'Sure!\n```json\n{"steps": [{"command": "df -h"}]}\n```'
    assert parse_reply(fenced) == [TerminalStep(command="df -h")]
    assert parse_reply('{"steps": []}') == []  # the model finds the task done already
    for bad in ("no json here", '{"plan": 1}', '{"steps": [{"command": ""}]}'):
        with pytest.raises(ValueError):
            parse_reply(bad)


async def test_a_prose_task_is_planned_by_the_model_over_http(
    llm: ScriptedLLM, engine: Engine
) -> None:
    llm.replies.append(Reply('{"steps": [{"command": "df -h /"}, {"command": "free -m"}]}'))
    plan = await ActivityEnvironment().run(
        planner_for(engine, llm).plan,
        PlanRequest(task_id="t", prompt="how full is the disk and memory?"),
    )
    assert plan.steps == [TerminalStep(command="df -h /"), TerminalStep(command="free -m")]
    (request,) = llm.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "test-model"
    assert "how full is the disk" in request["body"]["messages"][-1]["content"]


async def test_a_modification_replans_with_what_was_done(llm: ScriptedLLM, engine: Engine) -> None:
    llm.replies.append(Reply('{"steps": [{"command": "du -sh /var"}]}'))
    request = PlanRequest(
        task_id="t",
        prompt="check the disk",
        instruction="look at /var only",
        notes=["look at /var only"],
        done=[
            DoneStep(
                step=TerminalStep(command="df -h"),
                outcome=StepOutcome(exit_code=0, output_tail="42%"),
            )
        ],
    )
    plan = await ActivityEnvironment().run(planner_for(engine, llm).plan, request)
    assert plan.steps == [TerminalStep(command="du -sh /var")]
    sent = llm.requests[0]["body"]["messages"][-1]["content"]
    assert "look at /var only" in sent and "$ df -h" in sent and "42%" in sent


async def test_the_verifier_judges_the_result_and_writes_the_answer(
    llm: ScriptedLLM, engine: Engine
) -> None:
    llm.replies.append(Reply('{"ok": true, "answer": "2 3 5 7", "reason": "the primes are shown"}'))
    request = VerifyRequest(
        task_id="t",
        prompt="print the first four primes",
        done=[
            DoneStep(
                step=TerminalStep(command="python3 primes.py"),
                outcome=StepOutcome(exit_code=0, output_tail="2 3 5 7\n"),
            )
        ],
    )
    verdict = await ActivityEnvironment().run(planner_for(engine, llm).verify, request)
    assert (verdict.ok, verdict.answer, verdict.reason) == (True, "2 3 5 7", "the primes are shown")
    assert (verdict.provider, verdict.usage.total_tokens) == ("p0", 15)
    sent = llm.requests[0]["body"]["messages"]
    assert "check the work" in sent[0]["content"] and "python3 primes.py" in sent[-1]["content"]
    llm.replies += [Reply("looks fine to me"), Reply("still fine")]  # a reply, its repair
    other = request.model_copy(update={"prompt": "print the first five primes"})
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(planner_for(engine, llm).verify, other)
    assert caught.value.type == "BadVerdict" and not caught.value.non_retryable


async def test_a_bad_reply_is_a_retryable_error(llm: ScriptedLLM, engine: Engine) -> None:
    # A reply that is no plan, and its repair that is not either.
    llm.replies += [Reply("I cannot help with that."), Reply("No."),
                    Reply('{"steps": [{"command": "ls"}]}')]  # fmt: skip
    planner, request = planner_for(engine, llm), PlanRequest(task_id="t", prompt="x")
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(planner.plan, request)
    assert caught.value.type == "BadPlan" and not caught.value.non_retryable
    # The bad reply was not cached: the retry asks the model again, and its plan is kept.
    plan = await ActivityEnvironment().run(planner.plan, request)
    assert plan.steps == [TerminalStep(command="ls")] and not plan.cached
    again = await ActivityEnvironment().run(planner.plan, request)
    assert again.cached and len(llm.requests) == 3


async def test_prose_without_a_model_fails_fast_and_says_how_to_configure(
    engine: Engine,
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            planner_for(engine).plan, PlanRequest(task_id="t", prompt="tidy my home dir")
        )
    assert caught.value.non_retryable
    assert "BERTH_LLM_MODEL" in str(caught.value) and "'$ '" in str(caught.value)


async def test_the_plan_comes_from_the_second_provider_when_the_first_fails(
    engine: Engine,
) -> None:
    plan_text = '{"steps": [{"command": "uptime"}]}'
    with ScriptedLLM(default=Reply(status=500)) as down, ScriptedLLM(plan_text) as backup:
        planner = planner_for(engine, down, backup, llm_retries=1)
        plan = await ActivityEnvironment().run(
            planner.plan, PlanRequest(task_id="t", prompt="how long has it been up?")
        )
        assert plan.steps == [TerminalStep(command="uptime")]
        assert (plan.provider, plan.model, plan.cached) == ("p1", "test-model", False)
        assert plan.usage.total_tokens == 15
        assert len(down.requests) == 2  # one try and one retry, then the next provider

        # The same task again: the plan comes from the cache, no provider is asked.
        again = await ActivityEnvironment().run(
            planner.plan, PlanRequest(task_id="t2", prompt="how long has it been up?")
        )
        assert again.steps == plan.steps and again.cached and again.provider == "p1"
        assert len(backup.requests) == 1 and len(down.requests) == 2


async def test_when_every_provider_fails_the_error_names_each(engine: Engine) -> None:
    with (
        ScriptedLLM(default=Reply(status=503)) as first,
        ScriptedLLM(default=Reply(status=401)) as second,
        pytest.raises(ApplicationError) as caught,
    ):
        await ActivityEnvironment().run(
            planner_for(engine, first, second, llm_retries=0).plan,
            PlanRequest(task_id="t", prompt="x"),
        )
    assert caught.value.type == "LLMUnavailable" and not caught.value.non_retryable
    assert "p0 (test-model)" in str(caught.value) and "503" in str(caught.value)
    assert "p1 (test-model)" in str(caught.value) and "401" in str(caught.value)


def test_the_models_context_keeps_steps_brief() -> None:
    done = DoneStep(
        step=FileStep(op="write", path="big.py", content="x" * 50_000),
        outcome=StepOutcome(exit_code=0, result=StepResult(content="y" * 7000, title="T")),
    ).brief()
    assert isinstance(done.step, FileStep) and len(done.step.content or "") == BRIEF_CHARS + 1
    assert done.outcome.result is not None
    assert (
        len(done.outcome.result.content or "") == BRIEF_CHARS and done.outcome.result.title == "T"
    )
