"""Issue 17, defect 10's rest, on the Temporal dev server with stub activities (the edge):
a queued task is checked against what the session may carry to its next run."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from tests.workflows.test_session import Stubs, end, env, params, running, submit, until
from workflows.models import TaskSubmission

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
