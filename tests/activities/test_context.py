"""The model's context stays within its window: a long task's older steps are summarized
(deterministically) and long outputs kept as head, tail and the lines the check wants."""

from __future__ import annotations

from sqlalchemy import Engine
from temporalio.testing import ActivityEnvironment

from activities.context import excerpt
from activities.models import DoneStep, PlanRequest
from activities.planning import PlanningActivities
from config.settings import LLMProvider, Settings
from llm.proxy import LLMProxy
from llm.tokens import count_messages, count_text, prompt_budget
from sandboxes.models import Check, StepOutcome, TerminalStep
from tests.support.scripted_llm import ScriptedLLM


def long_task(steps: int) -> PlanRequest:
    done = [
        DoneStep(
            step=TerminalStep(command=f"python3 stage{n}.py"),
            outcome=StepOutcome(
                exit_code=0 if n % 3 else 1,
                output_tail="".join(f"stage {n} line {i}: {'x' * 60}\n" for i in range(60)),
            ),
        )
        for n in range(steps)
    ]
    return PlanRequest(task_id="t", prompt="run the ten stages, fixing what fails", done=done)


async def test_a_long_tasks_context_is_summarized_within_the_budget(engine: Engine) -> None:
    with ScriptedLLM(default='{"steps": []}') as server:
        provider = LLMProvider(
            name="small", model="local-model", base_url=f"{server.url}/v1", context_tokens=4000
        )
        planner = PlanningActivities(LLMProxy(Settings(llm_providers=[provider]), engine))
        request = long_task(10)
        await ActivityEnvironment().run(planner.plan, request)
        await ActivityEnvironment().run(planner.plan, request)  # told the same: a cache hit
    messages = server.requests[0]["body"]["messages"]
    assert len(server.requests) == 1
    # In full, it would be several times the window.
    whole = sum(len(d.outcome.output_tail) for d in request.done)
    assert count_text(provider, "x" * whole) > 3 * provider.context_tokens
    assert count_messages(provider, messages) <= prompt_budget(provider)
    text = messages[-1]["content"]
    assert "Earlier steps, in brief, oldest first:\n- $ python3 stage0.py -> exited with 1" in text
    # The latest steps are in full, with their outputs' heads and tails.
    assert "$ python3 stage9.py\n-> exited with 1\noutput: stage 9 line 0" in text
    assert "stage 9 line 59" in text and "stage 8 line 59" in text


async def test_a_short_tasks_context_is_whole(engine: Engine) -> None:
    with ScriptedLLM(default='{"steps": []}') as server:
        provider = LLMProvider(name="p", model="gpt-4o-mini", base_url=f"{server.url}/v1")
        planner = PlanningActivities(LLMProxy(Settings(llm_providers=[provider]), engine))
        await ActivityEnvironment().run(planner.plan, long_task(1))
    text = server.requests[0]["body"]["messages"][-1]["content"]
    assert "in brief" not in text and "characters cut" in text  # 4,000 chars shown as 1,500


def test_a_long_output_keeps_head_tail_and_the_lines_the_check_wants() -> None:
    output = "".join(f"row {i}\n" for i in range(2000))
    output = output.replace("row 1000\n", "row 1000 TOTAL=42\n")
    kept = excerpt(output, Check(kind="output_contains", value="TOTAL="), 400)
    assert kept.startswith("row 0\n") and kept.endswith("row 1999\n")
    assert "the lines the check looks for:]\nrow 1000 TOTAL=42\n[...]" in kept
    assert "row 500\n" not in kept
    regex = excerpt(output, Check(kind="output_regex", value=r"TOTAL=\d+"), 400)
    assert "row 1000 TOTAL=42" in regex
    assert excerpt("short", None, 400) == "short"


def test_openai_models_are_counted_by_their_tokenizer_and_others_estimated_high() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    openai = LLMProvider(name="o", model="gpt-4o-mini")
    local = LLMProvider(name="l", model="llama3.2")
    claude = LLMProvider(name="a", kind="anthropic", model="claude-3-5-haiku-latest")
    assert count_text(openai, text) == 201  # o200k_base: 10 a sentence, the last space 1
    assert count_text(local, text) == count_text(claude, text) == 300  # 3 characters a token
