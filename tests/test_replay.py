"""Replays a recorded SessionWorkflow history: a change to the workflow that would break
running sessions (non-determinism) fails here. Re-record with
``BERTH_RECORD_HISTORY=1 pytest tests/test_workflow.py -k runs_its_steps`` when a change is
meant to be incompatible (and version it with workflow.patched)."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.session import SessionWorkflow

HISTORY = Path(__file__).parent / "histories" / "session.json"


async def test_the_recorded_session_history_replays() -> None:
    history = WorkflowHistory.from_json("session-replay", HISTORY.read_text())
    assert any(e.HasField("activity_task_scheduled_event_attributes") for e in history.events)
    replayer = Replayer(workflows=[SessionWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
