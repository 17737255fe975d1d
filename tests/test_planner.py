"""Planning: user-written plans, and a real LangChain client against a scripted
OpenAI-compatible server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.planning import PlanningActivities, chat_model, parse_reply
from berth.settings import Settings
from sandboxes.models import StepOutcome, TerminalStep
from tests.scripted_llm import ScriptedLLM, scripted_llm
from workflows.models import DoneStep, PlanRequest, Verdict, VerifyRequest
from workflows.plans import MAX_PLAN_STEPS, check_plan_size, user_plan


@pytest.fixture
def llm() -> Iterator[ScriptedLLM]:
    with scripted_llm() as server:
        yield server


def planner_for(server: ScriptedLLM) -> PlanningActivities:
    settings = Settings(
        llm_model="openai:test-model",
        openai_base_url=server.url,
        openai_api_key="sk-test",
    )
    return PlanningActivities(chat_model(settings))


def test_dollar_lines_are_a_plan_and_prose_is_not() -> None:
    steps = user_plan("$ echo hello && uname -a\n\n  $ ls -la /  \n")
    assert steps is not None
    assert [s.describe() for s in steps] == ["$ echo hello && uname -a", "$ ls -la /"]
    assert user_plan("list the files\n$ ls") is None
    assert user_plan("   ") is None


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


async def test_a_prose_task_is_planned_by_the_model_over_http(llm: ScriptedLLM) -> None:
    llm.replies.append('{"steps": [{"command": "df -h /"}, {"command": "free -m"}]}')
    plan = await ActivityEnvironment().run(
        planner_for(llm).plan, PlanRequest(task_id="t", prompt="how full is the disk and memory?")
    )
    assert plan.steps == [TerminalStep(command="df -h /"), TerminalStep(command="free -m")]
    (request,) = llm.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "test-model"
    assert "how full is the disk" in request["body"]["messages"][-1]["content"]


async def test_a_modification_replans_with_what_was_done(llm: ScriptedLLM) -> None:
    llm.replies.append('{"steps": [{"command": "du -sh /var"}]}')
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
    plan = await ActivityEnvironment().run(planner_for(llm).plan, request)
    assert plan.steps == [TerminalStep(command="du -sh /var")]
    sent = llm.requests[0]["body"]["messages"][-1]["content"]
    assert "look at /var only" in sent and "$ df -h" in sent and "42%" in sent


async def test_the_verifier_judges_the_result_and_writes_the_answer(llm: ScriptedLLM) -> None:
    llm.replies.append('{"ok": true, "answer": "2 3 5 7", "reason": "the primes are shown"}')
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
    verdict = await ActivityEnvironment().run(planner_for(llm).verify, request)
    assert verdict == Verdict(ok=True, answer="2 3 5 7", reason="the primes are shown")
    sent = llm.requests[0]["body"]["messages"]
    assert "check the work" in sent[0]["content"] and "python3 primes.py" in sent[-1]["content"]
    llm.replies.append("looks fine to me")
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(planner_for(llm).verify, request)
    assert caught.value.type == "BadVerdict" and not caught.value.non_retryable


async def test_a_bad_reply_is_a_retryable_error(llm: ScriptedLLM) -> None:
    llm.replies.append("I cannot help with that.")
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(planner_for(llm).plan, PlanRequest(task_id="t", prompt="x"))
    assert caught.value.type == "BadPlan" and not caught.value.non_retryable


async def test_prose_without_a_model_fails_fast_and_says_how_to_configure() -> None:
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            PlanningActivities(None).plan, PlanRequest(task_id="t", prompt="tidy my home dir")
        )
    assert caught.value.non_retryable
    assert "BERTH_LLM_MODEL" in str(caught.value) and "'$ '" in str(caught.value)
