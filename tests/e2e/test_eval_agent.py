"""The agent evaluation's harness against a scripted model: the whole system, the suite's
pages, a few tasks run, graded in their sandboxes, and reported. (The model answers each
task from the task's own scripted solution; real providers are `make eval-agent`'s.)"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.agent_eval import evaluate, system_with_pages, table
from bench.agent_tasks import TASKS, EvalTask
from tests.support.scripted_llm import ScriptedLLM

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
SCRIPTED = [t for t in TASKS if t.solution]


class Solutions:
    """The scripted model: each task's plans in turn, then its verdict."""

    def __init__(self, tasks: list[EvalTask]) -> None:
        self.tasks = tasks
        self.web = ""
        self.planned: Counter[str] = Counter()

    def __call__(self, body: dict[str, Any]) -> str:
        asked = body["messages"][1]["content"]
        task = next(t for t in self.tasks if t.prompt.replace("{web}", self.web) in asked)
        *plans, verdict = task.solution
        if body["response_format"]["json_schema"]["name"] == "verdict":
            return json.dumps(verdict)
        n = self.planned[task.name]
        self.planned[task.name] += 1
        plan = plans[n] if n < len(plans) else {"steps": []}
        return json.dumps(plan).replace("{web}", self.web)


def test_the_harness_runs_grades_and_reports_scripted_tasks(tmp_path: Path) -> None:
    assert {t.kind for t in SCRIPTED} >= {"files", "web", "refused"}
    solutions = Solutions(SCRIPTED)
    lines: list[str] = []
    with (
        ScriptedLLM(script=solutions) as llm,
        system_with_pages(llm.settings, tmp_path / "data") as (base, web),
    ):
        solutions.web = web
        results = evaluate(base, web, ["openai"], SCRIPTED, lines.append)
    by_name = {r.task: r for r in results}
    assert all(r.success for r in results), results
    assert lines == [f"openai {t.name}: pass" for t in SCRIPTED]
    # The refused construct (awk) was refused, fed back, and the task re-planned.
    refused = by_name["sum-numbers"]
    assert (refused.refusals, refused.revisions, refused.steps) == (1, 1, 3)
    assert by_name["count-errors"].steps == 1 and by_name["count-errors"].tokens > 0
    report = table(results)
    assert f"| **openai** | **total** | | **{len(SCRIPTED)}/{len(SCRIPTED)}** |" in report
