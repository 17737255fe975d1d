"""Issue 17, defect 10's rest, on the Temporal dev server with stub activities (the edge):
a queued task is checked against what the session may carry to its next run; a database
outage is waited out on a timer, not inside one workflow task."""

from __future__ import annotations

import asyncio

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType as HistoryEvent
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from activities.models import ProgressBatch
from store.events import EventType
from tests.workflows.test_session import (
    Stubs,
    end,
    env,
    params,
    running,
    save_history,
    submit,
    until,
)
from workflows.models import TaskSubmission
from workflows.session import SessionWorkflow

__all__ = ["env"]


async def test_a_task_that_would_carry_the_session_past_its_bound_is_refused(
    env: WorkflowEnvironment,
) -> None:
    """Before, any task the queue had room for was taken, and the carried state (the queue's
    prompts with it) could pass the bound, which the continue-as-new check did not stop."""
    stubs = Stubs()
    session = params(stubs).model_copy(update={"max_carried_bytes": 4000})
    async with running(env, stubs, session) as handle:
        await submit(env.client, handle.id, "$ wait")
        await until(lambda: stubs.commands == ["wait"])
        await submit(env.client, handle.id, "$ echo " + "a" * 1000)  # fits
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(
                "submit_task", arg=TaskSubmission(prompt="$ echo " + "b" * 3000)
            )
        assert "past its 4000" in str(refused.value.cause)
        # In bytes, as the server counts them: 1,000 characters of CJK text are 3,000.
        with pytest.raises(WorkflowUpdateFailedError):
            await handle.execute_update(
                "submit_task", arg=TaskSubmission(prompt="$ echo " + "語" * 1000)
            )
        stubs.release.set()
        await until(lambda: stubs.commands == ["wait", "echo " + "a" * 1000])
        await end(handle)


class Outage(Stubs):
    """Stubs whose database is down until ``outage`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.outage = True
        self.tries = 0

    @activity.defn(name="RecordProgress")
    async def record(self, batch: ProgressBatch) -> list[int]:
        self.tries += 1
        if self.outage:
            raise RuntimeError("connection refused")
        return await super().record(batch)


async def test_a_database_outage_is_waited_out_on_a_timer(env: WorkflowEnvironment) -> None:
    """Before, the progress local activity was retried without end inside one workflow
    task: during an outage the task never ended (its heartbeats filled the history) and no
    durable wait came. Now it gives up after its bound and records again after a timer."""
    stubs = Outage()
    async with running(env, stubs, params(stubs)) as handle:
        async with asyncio.timeout(60):
            while True:
                kinds = [e.event_type for e in (await handle.fetch_history()).events]
                if HistoryEvent.EVENT_TYPE_TIMER_STARTED in kinds:
                    break
                await asyncio.sleep(0.5)
        assert stubs.tries > 1 and not stubs.events
        state = await handle.query(SessionWorkflow.state)  # answered meanwhile
        assert state.sandbox is not None
        stubs.outage = False
        ref = await submit(env.client, handle.id, "$ echo back")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("record-outage", await handle.fetch_history())
    # Every event once, the batch that waited included (the task was queued meanwhile).
    assert sorted(stubs.types()[:3]) == [
        EventType.sandbox_ready,
        EventType.session_status,
        EventType.task_queued,
    ]
    assert len({e.key for e in stubs.events}) == len(stubs.events)
