"""SessionWorkflow with stubbed activities on Temporal's time-skipping test server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from sandboxes.models import SandboxInfo, StepOutcome
from tests.conftest import TEMPORAL, TEMPORAL_TEST_SERVER
from workflows.models import (
    Plan,
    PlanRequest,
    ProgressEvent,
    SandboxRequest,
    SessionInput,
    StepRequest,
    TaskControl,
    TaskModification,
    TaskRef,
    TaskSubmission,
)
from workflows.session import SessionWorkflow

HISTORY = Path(__file__).parent / "histories" / "session.json"


class Stubs:
    """Activities with the real names, recording what the workflow asked for."""

    def __init__(self) -> None:
        self.queue = f"test-{uuid.uuid4().hex[:8]}"  # one per test: no leftovers between tests
        self.events: list[ProgressEvent] = []
        self.destroyed: list[str] = []
        self.commands: list[str] = []
        self.release = asyncio.Event()

    @activity.defn(name="ProvisionSandbox")
    async def provision(self, request: SandboxRequest) -> SandboxInfo:
        if request.template == "broken":
            raise RuntimeError("no such image")
        return SandboxInfo(
            id="sbx", session_id=request.session_id, provider="stub", host_id="h",
            task_queue=self.queue, template=request.template, handle="h1",
        )  # fmt: skip

    @activity.defn(name="DestroySandbox")
    async def destroy(self, sandbox: SandboxInfo) -> None:
        self.destroyed.append(sandbox.id)

    @activity.defn(name="PlanTask")
    async def plan(self, request: PlanRequest) -> Plan:
        from activities.planning import user_plan

        steps = user_plan(request.instruction or request.prompt)
        assert steps is not None
        return Plan(steps=steps)

    @activity.defn(name="RunStep")
    async def run_step(self, request: StepRequest) -> StepOutcome:
        command = request.step.command
        self.commands.append(command)
        if command == "wait":
            while not self.release.is_set():
                activity.heartbeat()
                await asyncio.sleep(0.05)
        code = 1 if command == "false" else 0
        return StepOutcome(exit_code=code, output_tail=f"ran {command}\n")

    @activity.defn(name="RecordProgress")
    async def record(self, event: ProgressEvent) -> int:
        self.events.append(event)
        return len(self.events)

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def all(self) -> list[Callable[..., Any]]:
        return [self.provision, self.destroy, self.plan, self.run_step, self.record]


async def time_skipping() -> WorkflowEnvironment:
    return await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(TEMPORAL_TEST_SERVER),
        data_converter=pydantic_data_converter,
    )


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """A real dev server for tests that drive a session step by step: the time-skipping
    server hung now and then when a test polled while the session's timers were pending."""
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL),
        data_converter=pydantic_data_converter,
        dev_server_extra_args=["--log-level", "warn"],
    ) as env:
        yield env


@pytest.fixture
async def own_env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping server, for the test that needs ten idle minutes to pass at once."""
    async with await time_skipping() as env:
        yield env


def params(stubs: Stubs, template: str = "default") -> SessionInput:
    return SessionInput(
        session_id=uuid.uuid4().hex, template=template, host_task_queue=stubs.queue,
        idle_timeout_s=86400, step_timeout_s=60,
    )  # fmt: skip


async def submit(client: Client, wf_id: str, prompt: str) -> TaskRef:
    handle = client.get_workflow_handle(wf_id)
    ref: TaskRef = await handle.execute_update(
        "submit_task", result_type=TaskRef, arg=TaskSubmission(prompt=prompt)
    )
    return ref


@contextlib.asynccontextmanager
async def running(
    env: WorkflowEnvironment, stubs: Stubs, session: SessionInput
) -> AsyncIterator[WorkflowHandle]:  # type: ignore[type-arg]
    """A worker with the stubs, and a session workflow started on it."""
    async with Worker(
        env.client, task_queue=stubs.queue, workflows=[SessionWorkflow], activities=stubs.all()
    ):
        yield await env.client.start_workflow(
            SessionWorkflow.run, session, id=f"s-{session.session_id}", task_queue=stubs.queue
        )


async def end(handle: WorkflowHandle) -> None:  # type: ignore[type-arg]
    """End the session and wait for its clean-up, while the test's worker still runs."""
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()


async def until(predicate: Callable[[], bool]) -> None:
    """Poll what the stubs saw (they live in this process) for up to ten seconds."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_task_runs_its_steps_and_ending_the_session_destroys_the_sandbox(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "$ echo hello\n$ uname -a")
        assert ref.status == "queued"
        await until(
            lambda: (
                "succeeded"
                in [e.data.get("status") for e in stubs.events if e.type == "task.status"]
            )
        )
        state = await handle.query(SessionWorkflow.state)
        assert state.status == "ready" and state.tasks[0].status == "succeeded"
        assert stubs.commands == ["echo hello", "uname -a"]
        await end(handle)
        if os.environ.get("BERTH_RECORD_HISTORY"):
            HISTORY.parent.mkdir(exist_ok=True)
            HISTORY.write_text((await handle.fetch_history()).to_json())
    assert stubs.destroyed == ["sbx"]
    # A task may be queued while the sandbox is still being provisioned.
    assert sorted(stubs.types()[:3]) == ["sandbox.ready", "session.status", "task.queued"]
    assert stubs.types()[-2:] == ["sandbox.destroyed", "session.status"]
    assert stubs.events[-1].data == {"status": "ended"}
    assert len({e.key for e in stubs.events}) == len(stubs.events)  # every event has its own key


async def test_a_failing_step_fails_the_task_and_skips_the_rest(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        await submit(env.client, handle.id, "$ false\n$ echo never")
        await until(
            lambda: any(
                e.data.get("status") == "failed" for e in stubs.events if e.type == "task.status"
            )
        )
        failed = next(
            e for e in stubs.events if e.type == "task.status" and e.data["status"] == "failed"
        )
        assert "step 1 ($ false) exited with 1" in failed.data["error"]
        assert stubs.commands == ["false"]
        await end(handle)


async def test_pause_resume_modify_and_cancel(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "$ wait\n$ echo second\n$ echo third")
        await until(lambda: stubs.commands == ["wait"])
        control = TaskControl(task_id=ref.id)
        assert (
            await handle.execute_update("pause_task", result_type=TaskRef, arg=control)
        ).status == "paused"
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update("pause_task", result_type=TaskRef, arg=control)
        assert "is paused, not planning" in str(refused.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(
                "cancel_task", result_type=TaskRef, arg=TaskControl(task_id="nope")
            )
        assert "no task nope" in str(refused.value.cause)
        change = TaskModification(task_id=ref.id, instruction="$ echo instead")
        await handle.execute_update("modify_task", result_type=TaskRef, arg=change)
        stubs.release.set()
        await asyncio.sleep(0.3)
        assert stubs.commands == ["wait"]  # paused: nothing more runs
        assert (
            await handle.execute_update("resume_task", result_type=TaskRef, arg=control)
        ).status == "running"
        await until(lambda: stubs.commands == ["wait", "echo instead"])
        plans = [e.data for e in stubs.events if e.type == "task.plan"]
        assert plans[-1]["first"] == 1 and plans[-1]["steps"][0]["command"] == "echo instead"

        stubs.release.clear()
        second = await submit(env.client, handle.id, "$ wait\n$ echo never")
        await until(lambda: stubs.commands[-1] == "wait")
        cancelled = await handle.execute_update(
            "cancel_task", result_type=TaskRef, arg=TaskControl(task_id=second.id)
        )
        assert cancelled.status == "cancelled"
        assert "echo never" not in stubs.commands
        state = await handle.query(SessionWorkflow.state)
        assert [t.status for t in state.tasks] == ["succeeded", "cancelled"]
        await until(lambda: stubs.events[-1].data == {"status": "ready"})
        await end(handle)


async def test_a_failed_provision_fails_the_session_cleanly(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs, template="broken")) as handle:
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    assert stubs.destroyed == []
    assert stubs.events[-1].type == "session.status"
    assert (
        stubs.events[-1].data["status"] == "failed"
        and "no such image" in stubs.events[-1].data["error"]
    )


async def test_an_idle_session_ends_itself(own_env: WorkflowEnvironment) -> None:
    env = own_env
    stubs = Stubs()
    async with running(
        env, stubs, params(stubs).model_copy(update={"idle_timeout_s": 600})
    ) as handle:
        state = await handle.result()  # the test server skips the ten idle minutes
    assert state.status == "ended" and stubs.destroyed == ["sbx"]
