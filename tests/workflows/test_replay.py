"""Replays recorded SessionWorkflow histories, one per path (happy, cancel, failure,
continue-as-new), and SandboxPool's (a stop with a boot in flight): a change to a
workflow that would break running ones (non-determinism) fails here.

Histories are kept per workflow version in tests/workflows/histories/<version>/. Record a new
version's with ``BERTH_RECORD_HISTORY=1 pytest tests/workflows/test_session.py`` (after pointing
``HISTORIES`` there at a new folder); a compatible change keeps replaying the old ones, an
incompatible one is versioned with workflow.patched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.pool import SandboxPool
from workflows.session import SessionWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*/*.json"))


def test_every_path_has_a_recorded_history() -> None:
    assert {p.stem for p in HISTORIES} >= {"happy", "cancel", "failure", "continue-as-new", "agent"}


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: f"{p.parent.name}/{p.stem}")
async def test_a_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(f"replay-{path.stem}", path.read_text())  # noqa: ASYNC240
    assert any(e.HasField("activity_task_scheduled_event_attributes") for e in history.events)
    replayer = Replayer(
        workflows=[SessionWorkflow, SandboxPool], data_converter=pydantic_data_converter
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
