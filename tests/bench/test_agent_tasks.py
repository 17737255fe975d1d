"""The agent evaluation's tasks and graders, without a system: enough tasks of every kind,
and no grader that passes before its task is done."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.agent_eval import file_plan, grader_plan, table
from bench.agent_pages import serve
from bench.agent_tasks import GRADER_HEAD, TASKS, TOTALS, EvalTask
from workflows.plans import check_plan_size, step_plan


def test_the_suite_has_at_least_25_tasks_of_every_kind() -> None:
    assert len(TASKS) >= 25 and len({t.name for t in TASKS}) == len(TASKS)
    kinds = {t.kind for t in TASKS}
    assert kinds == {"files", "script", "fix", "multistep", "web", "refused"}


def grade(task: EvalTask, home: Path, web: str) -> subprocess.CompletedProcess[str]:
    source = GRADER_HEAD + task.grader.replace("{web}", web) + "\nprint('PASS')\n"
    return subprocess.run(
        [sys.executable, "-c", source], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_no_grader_passes_before_its_task_is_done(task: EvalTask, tmp_path: Path) -> None:
    for path, content in task.files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    with serve("127.0.0.1", 0) as pages:
        graded = grade(task, tmp_path, f"http://127.0.0.1:{pages.server_address[1]}")
    assert graded.returncode == 1 and graded.stdout.startswith("FAIL:"), graded


def test_setup_and_grader_are_written_plans_the_workflow_accepts() -> None:
    task = next(t for t in TASKS if t.name == "csv-totals")
    for plan in (file_plan(task.files), grader_plan(task, "http://10.0.0.1:8080")):
        assert check_plan_size(plan) == plan
    steps = step_plan(grader_plan(task, "http://x"))
    assert [s.describe() for s in steps][1] == "$ python3 .eval/grade.py"


def test_a_grader_passes_a_task_done_right(tmp_path: Path) -> None:
    task = next(t for t in TASKS if t.name == "csv-totals")
    (tmp_path / "totals.json").write_text(json.dumps(TOTALS))
    assert grade(task, tmp_path, "").stdout.strip() == "PASS"


def test_the_table_sums_per_provider() -> None:
    from bench.agent_eval import Result

    rows = [
        Result("a", "files", "p", True, "succeeded", 2, 0, 0, 100, 0.01, 1.5),
        Result("b", "refused", "p", False, "failed", 4, 1, 1, 300, 0.02, 3.0, "FAIL: x"),
    ]
    text = table(rows)
    assert "| p | b | refused | no | 4 | 1 | 1 | 300 | 0.0200 | 3.0 |" in text
    assert "| **p** | **total** | | **1/2** | 6 | 1 | 1 | 400 | 0.0300 | 4.5 |" in text
