"""Task controls sent again (their first answer lost on the way): a pause, resume or cancel
that took effect answers the same again, not a 409; a control that did not is still refused.
Driven through the API's service layer against a session workflow on a real dev server, with
the workflow tests' stub activities."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api import service
from api.deps import Problem, TemporalLink
from config.settings import Settings
from store.models import SessionRow
from tests.workflows.test_session import Stubs, env, params, until
from workflows.client import workflow_id
from workflows.session import SessionWorkflow

__all__ = ["env"]  # the dev server fixture, shared with the workflow tests


class Linked(TemporalLink):
    """The API's link to Temporal, already holding the test server's client."""

    def __init__(self, environment: WorkflowEnvironment) -> None:
        super().__init__(Settings(session_update_timeout_s=10.0))
        self._client = environment.client


@pytest.fixture
async def session(env: WorkflowEnvironment) -> AsyncIterator[tuple[Stubs, SessionRow]]:
    stubs = Stubs()
    started = params(stubs)
    async with Worker(
        env.client,
        task_queue=stubs.queue,
        workflows=[SessionWorkflow],
        activities=stubs.all(),
        max_heartbeat_throttle_interval=timedelta(seconds=1),
    ):
        handle = await env.client.start_workflow(
            SessionWorkflow.run,
            started,
            id=workflow_id(started.session_id),
            task_queue=stubs.queue,
        )
        yield stubs, SessionRow(id=started.session_id, user_id="ann")
        stubs.release.set()
        await handle.cancel()


async def test_a_repeated_pause_resume_or_cancel_answers_as_the_first(
    env: WorkflowEnvironment, session: tuple[Stubs, SessionRow]
) -> None:
    stubs, row = session
    link = Linked(env)
    ref = await service.submit_task(link, row, "$ wait\n$ echo second")
    await until(lambda: stubs.commands == ["wait"])
    for action, status in (("pause", "paused"), ("resume", "running"), ("cancel", "cancelled")):
        for _ in range(2):
            answer = await service.control_task(link, row, ref.id, action)
            assert (answer.id, answer.status) == (ref.id, status), action
    # A control whose effect does not hold is still refused, with the workflow's reason.
    with pytest.raises(Problem) as refused:
        await service.control_task(link, row, ref.id, "pause")
    assert refused.value.status == 409 and "cancelled already" in refused.value.detail
