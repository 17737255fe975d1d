"""SessionWorkflow with stubbed activities, on Temporal's dev server (and the time-skipping
server for the idle timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity, workflow
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.models import (
    FLEET_TASK_QUEUE,
    Candidate,
    ClaimRequest,
    Fleet,
    Plan,
    PlanRequest,
    ProgressBatch,
    RestoreRequest,
    SandboxRequest,
    StepRequest,
    TaskVerdict,
    VerifyRequest,
)
from sandboxes.models import SandboxInfo, Step, StepOutcome, TerminalStep
from store.events import EventType, NewEvent
from store.models import HostState, TaskStatus
from tests.conftest import TEMPORAL, TEMPORAL_TEST_SERVER
from workflows import search
from workflows.models import (
    Carried,
    SandboxDeath,
    SessionInput,
    TaskControl,
    TaskModification,
    TaskRef,
    TaskSubmission,
)
from workflows.plans import STEPS
from workflows.session import SessionWorkflow

# One recorded history per path, replayed by tests/workflows/test_replay.py; a new version of the
# workflow adds a folder and keeps the old ones replaying.
HISTORIES = Path(__file__).parent / "histories" / "v6"
SHORT_HISTORY = 60


class Stubs:
    """Activities with the real names, recording what the workflow asked for."""

    def __init__(self) -> None:
        self.queue = f"test-{uuid.uuid4().hex[:8]}"  # one per test: no leftovers between tests
        self.events: list[NewEvent] = []
        self.provisioned: list[str] = []
        self.destroyed: list[str] = []
        self.commands: list[str] = []
        self.steps: list[Step] = []  # every step run, whatever its kind
        self.release = asyncio.Event()
        # A cancelled "wait" step is being killed, and may finish dying once this is set.
        self.killing = asyncio.Event()
        self.killed = asyncio.Event()
        self.killed.set()
        self.cancelled: list[str] = []
        self.stopped: list[str] = []
        self.thinking = asyncio.Event()
        self.thinking.set()
        # Scripted model replies: plans (commands) and verdicts, taken in order.
        self.plans: list[list[str]] = []
        self.verdicts: list[TaskVerdict] = []
        self.plan_requests: list[PlanRequest] = []
        self.power: list[str] = []
        # The warm pool: its ready VMs' ids, handed out in order; a claim waits for
        # ``pool_open`` (set), and what it handed out and relabelled is kept.
        self.pool: list[str] = []
        self.pool_open = asyncio.Event()
        self.pool_open.set()
        self.claims = 0
        self.claim_keys: list[str] = []
        self.claimed: list[str] = []
        self.assigned: list[str] = []
        self.preserved: list[str] = []
        self.restored: list[str] = []
        # A destroy waits for ``destroy_open`` (set); those begun are counted.
        self.destroy_open = asyncio.Event()
        self.destroy_open.set()
        self.destroys = 0

    @activity.defn(name="ProvisionSandbox")
    async def provision(self, request: SandboxRequest) -> SandboxInfo:
        self.provisioned.append(request.sandbox_id)
        if request.template == "broken":
            raise RuntimeError("no such image")
        return SandboxInfo(
            id=request.sandbox_id, session_id=request.session_id, provider="stub", host_id="h",
            task_queue=self.queue, template=request.template, handle="h1",
        )  # fmt: skip

    @activity.defn(name="DestroySandbox")
    async def destroy(self, sandbox: SandboxInfo) -> None:
        self.destroys += 1
        await self.destroy_open.wait()
        if sandbox.template == "undying":
            raise ApplicationError("the host does not answer", non_retryable=True)
        self.destroyed.append(sandbox.id)

    @activity.defn(name="PlanTask")
    async def plan(self, request: PlanRequest) -> Plan:
        """A stand-in model: "say X" plans ``echo X``; it thinks until ``thinking`` is set."""
        await self.thinking.wait()
        self.plan_requests.append(request)
        if self.plans:
            return Plan(steps=[TerminalStep(command=c) for c in self.plans.pop(0)])
        text = request.instruction or request.prompt
        return Plan(steps=[TerminalStep(command=f"echo {text.removeprefix('say ')}")])

    @activity.defn(name="VerifyTask")
    async def verify(self, request: VerifyRequest) -> TaskVerdict:
        if self.verdicts:
            return self.verdicts.pop(0)
        return TaskVerdict(ok=True, answer=request.done[-1].outcome.output_tail.strip())

    @activity.defn(name="RunStep")
    async def run_step(self, request: StepRequest) -> StepOutcome:
        self.steps.append(request.step)
        command = request.step.describe()[2:]  # "$ " and the command
        if command.startswith("python3 -c"):
            raise ApplicationError(
                "`python3 -c` runs inline code, which this policy refuses",
                type="CommandRefused",
                non_retryable=True,
            )
        self.commands.append(command)
        if command == "wait":
            try:
                while not self.release.is_set():
                    activity.heartbeat()
                    await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.killing.set()
                await self.killed.wait()  # as the real one waits for the guest's kill
                self.cancelled.append(command)
                raise
        code = 1 if command == "false" else 0
        return StepOutcome(exit_code=code, output_tail=f"ran {command}\n")

    @activity.defn(name="RecordProgress")
    async def record(self, batch: ProgressBatch) -> list[int]:
        self.events += batch.events
        return list(range(len(self.events) - len(batch.events), len(self.events)))

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def task_statuses(self) -> dict[str, str]:
        """The last status recorded for each task."""
        return {
            e.data["task_id"]: e.data["status"]
            for e in self.events
            if e.type == EventType.task_status
        }

    @activity.defn(name="StopStep")
    async def stop_step(self, request: StepRequest) -> None:
        self.stopped.append(request.step.describe()[2:])

    @activity.defn(name="HibernateSandbox")
    async def hibernate(self, sandbox: SandboxInfo) -> None:
        self.power.append(f"hibernate {sandbox.id}")

    @activity.defn(name="WakeSandbox")
    async def wake(self, sandbox: SandboxInfo) -> None:
        self.power.append(f"wake {sandbox.id}")

    @activity.defn(name="ClaimSandbox")
    async def claim(self, request: ClaimRequest) -> SandboxInfo | None:
        self.claims += 1
        self.claim_keys.append(request.claim)
        await self.pool_open.wait()
        if not self.pool:
            return None
        self.claimed.append(self.pool.pop(0))
        return SandboxInfo(
            id=self.claimed[-1], session_id=request.session_id, provider="stub", host_id="h",
            task_queue=self.queue, template=request.template, handle="warm",
        )  # fmt: skip

    @activity.defn(name="AssignSandbox")
    async def assign(self, sandbox: SandboxInfo) -> None:
        self.assigned.append(sandbox.id)

    @activity.defn(name="RestoreSandbox")
    async def restore(self, request: RestoreRequest) -> SandboxInfo:
        if request.preserved.id in self.restored:  # as the real one: the disk went with it
            raise ApplicationError("no kept disk", type="FileNotFoundError", non_retryable=True)
        self.restored.append(request.preserved.id)
        return request.preserved.model_copy(update={"id": request.sandbox_id})

    @activity.defn(name="PreserveSandbox")
    async def preserve(self, sandbox: SandboxInfo) -> None:
        self.preserved.append(sandbox.id)

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.provision, self.destroy, self.plan, self.verify, self.run_step, self.stop_step,
            self.record, self.hibernate, self.wake, self.claim, self.assign, self.preserve,
            self.restore,
        ]  # fmt: skip


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
        dev_server_extra_args=["--log-level", "warn", *search.dev_server_flags()],
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
    env: WorkflowEnvironment,
    stubs: Stubs,
    session: SessionInput,
    kind: type[SessionWorkflow] = SessionWorkflow,
    search_attributes: TypedSearchAttributes | None = None,
) -> AsyncIterator[WorkflowHandle]:  # type: ignore[type-arg]
    """A worker with the stubs, and a session workflow (or a test's variant of it, run
    outside the sandbox, which would re-import this module) started on it."""
    async with Worker(
        env.client,
        task_queue=stubs.queue,
        workflows=[kind],
        activities=stubs.all(),
        max_heartbeat_throttle_interval=timedelta(seconds=1),  # as berth/worker.py's
        workflow_runner=(
            SandboxedWorkflowRunner() if kind is SessionWorkflow else UnsandboxedWorkflowRunner()
        ),
    ):
        yield await env.client.start_workflow(
            kind.run,
            session,
            id=f"s-{session.session_id}",
            task_queue=stubs.queue,
            search_attributes=search_attributes,
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
                in [e.data.get("status") for e in stubs.events if e.type == EventType.task_status]
            )
        )
        state = await handle.query(SessionWorkflow.state)
        assert state.status == "ready" and state.finished == {ref.id: "succeeded"}
        assert stubs.commands == ["echo hello", "uname -a"]
        await end(handle)
    assert stubs.destroyed == stubs.provisioned and len(stubs.provisioned) == 1
    # A task may be queued while the sandbox is still being provisioned.
    assert sorted(stubs.types()[:3]) == [
        EventType.sandbox_ready,
        EventType.session_status,
        EventType.task_queued,
    ]
    assert stubs.types()[-2:] == [EventType.sandbox_destroyed, EventType.session_status]
    assert stubs.events[-1].data == {"status": "ended"}
    assert len({e.key for e in stubs.events}) == len(stubs.events)  # every event has its own key


async def test_a_step_plan_runs_its_steps_of_any_kind_as_written(env: WorkflowEnvironment) -> None:
    """A {"steps": [...]} prompt (what the MCP server's tools send) is a plan: no model."""
    stubs = Stubs()
    plan = {"steps": [
        {"kind": "file", "op": "write", "path": "notes.txt", "content": "hi"},
        {"kind": "browser", "action": "navigate", "url": "http://example.com/"},
    ]}  # fmt: skip
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, json.dumps(plan))
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        assert stubs.steps == STEPS.validate_python(plan["steps"])
        assert stubs.plan_requests == []
        save_history("step-plan", await handle.fetch_history())
        await end(handle)


async def test_a_failing_step_fails_the_task_and_skips_the_rest(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        await submit(env.client, handle.id, "$ false\n$ echo never")
        await until(
            lambda: any(
                e.data.get("status") == "failed"
                for e in stubs.events
                if e.type == EventType.task_status
            )
        )
        failed = next(
            e
            for e in stubs.events
            if e.type == EventType.task_status and e.data["status"] == "failed"
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
        plans = [e.data for e in stubs.events if e.type == EventType.task_plan]
        assert plans[-1]["first"] == 1 and plans[-1]["steps"][0]["command"] == "echo instead"

        stubs.release.clear()
        second = await submit(env.client, handle.id, "$ wait\n$ echo never")
        await until(lambda: stubs.commands[-1] == "wait")
        cancelled = await handle.execute_update(
            "cancel_task", result_type=TaskRef, arg=TaskControl(task_id=second.id)
        )
        assert cancelled.status == "cancelled"
        assert "echo never" not in stubs.commands
        assert stubs.stopped == ["wait"]  # and made sure no attempt left it running
        state = await handle.query(SessionWorkflow.state)
        assert state.finished == {ref.id: "succeeded", second.id: "cancelled"}
        await until(lambda: stubs.events[-1].data == {"status": "ready"})
        await end(handle)
        save_history("pause-resume-modify-cancel", await handle.fetch_history())


async def test_a_failed_provision_fails_the_session_cleanly(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs, template="broken")) as handle:
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    # Whatever a failed attempt may have left is destroyed too, by the id the workflow made.
    assert stubs.destroyed == stubs.provisioned[:1]
    assert stubs.events[-1].type == EventType.session_status
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
    assert state.status == "ended" and stubs.destroyed == stubs.provisioned


def save_history(name: str, history: Any, folder: Path = HISTORIES) -> None:
    """With BERTH_RECORD_HISTORY=1, keep this path's history for tests/workflows/test_replay.py."""
    if os.environ.get("BERTH_RECORD_HISTORY"):
        path = folder / f"{name}.json"
        # Write-once: a recorded history is what running workflows did; a new one goes in a
        # new version's folder.
        if path.exists():
            raise FileExistsError(f"{path} is recorded already; histories are never rewritten")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(history.to_json())


async def test_ending_the_session_mid_step_finishes_every_task_and_step(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        first = await submit(env.client, handle.id, "$ wait\n$ echo never")
        second = await submit(env.client, handle.id, "$ echo queued")
        await until(lambda: stubs.commands == ["wait"])
        await end(handle)
        save_history("cancel", await handle.fetch_history())
    assert stubs.cancelled == ["wait"] and stubs.commands == ["wait"]
    assert stubs.task_statuses() == {first.id: "cancelled", second.id: "cancelled"}
    finished = [e.data for e in stubs.events if e.type == EventType.step_finished]
    assert [(f["index"], f["status"]) for f in finished] == [(0, "cancelled")]
    assert stubs.destroyed == stubs.provisioned
    assert stubs.events[-1].data == {"status": "ended"}


async def test_cancel_then_end_answers_the_cancel_and_ends(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    stubs.killed.clear()  # the kill takes a while, so the end comes while it is under way
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "$ wait")
        await until(lambda: stubs.commands == ["wait"])
        cancel = asyncio.create_task(
            handle.execute_update(
                "cancel_task", result_type=TaskRef, arg=TaskControl(task_id=ref.id)
            )
        )
        await asyncio.wait_for(stubs.killing.wait(), 10)
        await handle.cancel()
        stubs.killed.set()
        assert (await asyncio.wait_for(cancel, 10)).status == "cancelled"
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 10)
    assert stubs.cancelled == ["wait"] and stubs.destroyed == stubs.provisioned
    assert stubs.task_statuses() == {ref.id: "cancelled"}
    assert stubs.events[-1].data == {"status": "ended"}


async def test_end_then_cancel_is_refused_at_once(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    stubs.killed.clear()
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "$ wait")
        await until(lambda: stubs.commands == ["wait"])
        await handle.cancel()
        await asyncio.wait_for(stubs.killing.wait(), 10)  # the session is ending now
        for name in ("cancel_task", "submit_task"):
            argument: Any = (
                TaskControl(task_id=ref.id)
                if name == "cancel_task"
                else TaskSubmission(prompt="$ x")
            )
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await asyncio.wait_for(
                    handle.execute_update(name, result_type=TaskRef, arg=argument), 10
                )
            assert "the session is ending" in str(refused.value.cause)
        stubs.killed.set()
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 10)
    assert stubs.task_statuses() == {ref.id: "cancelled"}
    assert stubs.destroyed == stubs.provisioned


async def test_a_prose_task_is_planned_by_the_model_and_modified(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "say hello")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        assert stubs.commands == ["echo hello"]
        statuses = [e.data["status"] for e in stubs.events if e.type == EventType.task_status]
        assert statuses == ["planning", "running", "succeeded"]
        failing = await submit(env.client, handle.id, "$ false")
        await until(lambda: stubs.task_statuses().get(failing.id) == "failed")
        save_history("failure", await handle.fetch_history())
        await end(handle)


@pytest.fixture(scope="module")
async def short_env() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server that suggests continue-as-new after a few dozen history events, so
    long sessions are cheap to test."""
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL),
        data_converter=pydantic_data_converter,
        dev_server_extra_args=[
            "--log-level", "warn",
            "--dynamic-config-value", f"limit.historyCount.suggestContinueAsNew={SHORT_HISTORY}",
        ],
    ) as env:  # fmt: skip
        yield env


async def test_continue_as_new_mid_task_keeps_the_sandbox_and_every_step(
    short_env: WorkflowEnvironment,
) -> None:
    env = short_env
    stubs = Stubs()
    commands = [f"echo {i}" for i in range(40)]
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "\n".join(f"$ {c}" for c in commands))
        queued = await submit(env.client, handle.id, "$ echo after")
        await until(lambda: stubs.task_statuses().get(queued.id) == "succeeded")
        first_run = handle.result_run_id
        latest = env.client.get_workflow_handle(handle.id)
        assert (await latest.describe()).run_id != first_run, "never continued as new"
        state = await latest.query(SessionWorkflow.state)
        assert state.sandbox is not None and state.sandbox.id == stubs.provisioned[0]
        save_history("continue-as-new", await env.client.get_workflow_handle(
            handle.id, run_id=first_run).fetch_history())  # fmt: skip
        await end(latest)
        save_history("continue-as-new-resumed", await latest.fetch_history())
    # Every step once, in order, in the one sandbox, which outlived every run but the last.
    assert stubs.commands == [*commands, "echo after"]
    assert len(stubs.provisioned) == 1 and stubs.destroyed == stubs.provisioned
    assert stubs.task_statuses() == {ref.id: "succeeded", queued.id: "succeeded"}
    started = [e.data["status"] for e in stubs.events if e.type == EventType.session_status]
    assert started.count("ended") == 1 and started[-1] == "ended"


async def test_signals_before_a_continue_as_new_are_acted_on_after_it(
    short_env: WorkflowEnvironment,
) -> None:
    """A machine's death and a coming end's preserve, said while a long task runs, hold in
    the run that continues it: the machine is replaced after the task, the end keeps the
    new machine's disk rather than destroying it."""
    env = short_env
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        commands = ["wait"] + [f"echo {i}" for i in range(30)]
        ref = await submit(env.client, handle.id, "\n".join(f"$ {c}" for c in commands))
        await until(lambda: stubs.commands == ["wait"])
        first_run = handle.result_run_id
        (dead,) = stubs.provisioned
        await handle.signal(SessionWorkflow.sandbox_died, SandboxDeath(sandbox_id=dead, detail="x"))
        await handle.signal(SessionWorkflow.preserve_sandbox)
        stubs.release.set()
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        latest = env.client.get_workflow_handle(handle.id)
        assert (await latest.describe()).run_id != first_run, "never continued as new"
        # Replaced after the task, and recorded: an end before that has nothing to keep.
        await until(lambda: [e.type for e in stubs.events].count(EventType.sandbox_ready) == 2)
        await end(latest)
    assert [e.data["sandbox_id"] for e in stubs.events if e.type == EventType.sandbox_died] == [
        dead
    ]
    assert stubs.destroyed == [dead] and stubs.preserved == stubs.provisioned[1:]


async def test_an_end_while_a_dead_machine_is_replaced_makes_no_new_one(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        await until(lambda: EventType.sandbox_ready in stubs.types())
        (dead,) = stubs.provisioned
        stubs.destroy_open.clear()  # the dead machine's removal is under way at the end
        await handle.signal(SessionWorkflow.sandbox_died, SandboxDeath(sandbox_id=dead, detail="x"))
        await until(lambda: stubs.destroys == 1)
        await handle.cancel()
        await asyncio.sleep(0.3)
        stubs.destroy_open.set()
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 10)
        save_history("replace-then-end", await handle.fetch_history())
    assert stubs.provisioned == stubs.destroyed == [dead]
    assert EventType.sandbox_orphaned not in stubs.types()
    assert stubs.events[-1].data == {"status": "ended"}


async def settled_history_length(handle: WorkflowHandle) -> int:  # type: ignore[type-arg]
    """The history's length once it has stopped growing: the workflow waits for more work."""
    previous = -1
    async with asyncio.timeout(20):
        while True:
            length = len((await handle.fetch_history()).events)
            if length == previous:
                return length
            previous = length
            await asyncio.sleep(0.3)


async def test_a_step_costs_six_history_events(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        await until(lambda: EventType.sandbox_ready in stubs.types())
        lengths = [await settled_history_length(handle)]
        for steps in (1, 11):
            task_id = (await submit(env.client, handle.id, "\n".join(["$ true"] * steps))).id
            await until(lambda: stubs.task_statuses().get(task_id) == "succeeded")  # noqa: B023
            lengths.append(await settled_history_length(handle))
        save_history("happy", await handle.fetch_history())
        await end(handle)
    one_step, eleven_steps = lengths[1] - lengths[0], lengths[2] - lengths[1]
    assert (eleven_steps - one_step) / 10 <= 6


async def test_a_sandbox_that_cannot_be_destroyed_still_ends_the_session(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs, template="undying")) as handle:
        await until(lambda: EventType.sandbox_ready in stubs.types())
        await end(handle)
    # Left for the host's reconciliation, and said so; the session's end is recorded.
    orphaned = next(e for e in stubs.events if e.type == EventType.sandbox_orphaned)
    assert "the host does not answer" in orphaned.data["error"]
    assert stubs.destroyed == [] and stubs.events[-1].data == {"status": "ended"}


async def test_a_pause_while_the_model_plans_holds_from_the_first_step(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    stubs.thinking.clear()
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "say hi")
        await until(lambda: stubs.task_statuses().get(ref.id) == "planning")
        control = TaskControl(task_id=ref.id)
        await handle.execute_update("pause_task", result_type=TaskRef, arg=control)
        stubs.thinking.set()
        await until(lambda: any(e.type == EventType.task_plan for e in stubs.events))
        await asyncio.sleep(0.3)
        assert stubs.commands == [] and stubs.task_statuses()[ref.id] == "paused"
        await handle.execute_update("resume_task", result_type=TaskRef, arg=control)
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        assert stubs.commands == ["echo hi"]
        await end(handle)


async def test_a_submission_key_queues_one_task_even_across_runs(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        refs = [
            # Distinct update ids, as after a continue-as-new, where Temporal's own
            # de-duplication of update ids no longer reaches.
            await handle.execute_update(
                "submit_task",
                TaskSubmission(prompt="$ echo once", key="k1"),
                id=f"submit-{n}",
                result_type=TaskRef,
            )
            for n in range(2)
        ]
        assert refs[0].id == refs[1].id
        await until(lambda: stubs.task_statuses().get(refs[0].id) == "succeeded")
        again = await handle.execute_update(
            "submit_task", TaskSubmission(prompt="$ echo once", key="k1"), result_type=TaskRef
        )
        assert again.id == refs[0].id and again.status == "succeeded"
        await end(handle)
    assert stubs.commands == ["echo once"] and stubs.types().count(EventType.task_queued) == 1


async def test_the_agent_revises_its_plan_until_the_result_is_verified(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    # The first plan's second step fails; the revision's result falls short of the goal;
    # the plan after that is verified.
    stubs.plans = [["echo one", "false", "echo skipped"], ["echo two"], ["echo three"]]
    stubs.verdicts = [
        TaskVerdict(ok=False, reason="the output lacks three"),
        TaskVerdict(ok=True, answer="three it is"),
    ]
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "count to three")
        await until(lambda: ref.id in stubs.task_statuses() and not stubs.plans)
        await until(lambda: stubs.task_statuses()[ref.id] == "succeeded")
        await end(handle)
        save_history("agent", await handle.fetch_history())
    assert stubs.commands == ["echo one", "false", "echo two", "echo three"]
    revisions = [e.data for e in stubs.events if e.type == EventType.task_plan]
    assert [(r["first"], r.get("revised")) for r in revisions] == [
        (0, None),
        (2, "step 2 ($ false) exited with 1"),
        (3, "the result falls short of the goal: the output lacks three"),
    ]
    # The planner heard why each revision was needed, and what had run.
    assert [r.feedback for r in stubs.plan_requests] == [
        None,
        *[r["revised"] for r in revisions[1:]],
    ]
    assert [d.step.describe()[2:] for d in stubs.plan_requests[2].done] == [
        "echo one",
        "false",
        "echo two",
    ]
    verified = [e.data for e in stubs.events if e.type == EventType.task_verified]
    assert [v["ok"] for v in verified] == [False, True]
    final = [e.data for e in stubs.events if e.type == EventType.task_status][-1]
    assert final == {"task_id": ref.id, "status": "succeeded", "result": "three it is"}


async def test_a_refused_command_is_fed_back_to_the_planner(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    stubs.plans = [["python3 -c 'print(1)'"], ["echo 1"]]
    async with running(env, stubs, params(stubs)) as handle:
        agent = await submit(env.client, handle.id, "print one")
        await until(lambda: stubs.task_statuses().get(agent.id) == "succeeded")
        written = await submit(env.client, handle.id, "$ python3 -c 'print(1)'\n$ echo never")
        await until(lambda: stubs.task_statuses().get(written.id) == "failed")
        await end(handle)
    assert stubs.commands == ["echo 1"]  # the refused ones never reached the sandbox
    refusals = [e.data for e in stubs.events if e.type == EventType.step_finished]
    assert [r["status"] for r in refusals] == ["refused", "refused"]
    assert "`python3 -c` runs inline code" in refusals[0]["error"]
    assert "`python3 -c` runs inline code" in (stubs.plan_requests[1].feedback or "")
    failed = [e.data for e in stubs.events if e.type == EventType.task_status][-1]
    assert failed["status"] == "failed" and "refused: `python3 -c`" in failed["error"]


async def test_a_task_that_runs_out_of_steps_fails_and_says_so(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    stubs.plans = [["false"]] * 10
    session = params(stubs).model_copy(update={"max_steps": 3})
    async with running(env, stubs, session) as handle:
        ref = await submit(env.client, handle.id, "never works")
        await until(lambda: stubs.task_statuses().get(ref.id) == "failed")
        await end(handle)
    assert stubs.commands == ["false"] * 3
    failed = [e.data for e in stubs.events if e.type == EventType.task_status][-1]
    assert "ran out of its step budget: 3 steps" in failed["error"]


async def test_an_idle_session_hibernates_and_the_next_task_wakes_it(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    session = params(stubs).model_copy(update={"hibernate_after_s": 0.5})
    async with running(env, stubs, session) as handle:
        await until(lambda: EventType.sandbox_hibernated in stubs.types())
        assert (await handle.query(SessionWorkflow.state)).status == "hibernated"
        ref = await submit(env.client, handle.id, "$ echo awake")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("hibernate", await handle.fetch_history())
    (sandbox,) = stubs.provisioned
    # Hibernated once while idle, woken for the task, and hibernated again before the end.
    assert stubs.power[:2] == [f"hibernate {sandbox}", f"wake {sandbox}"]
    assert stubs.commands == ["echo awake"]
    kinds = stubs.types()
    assert kinds.index(EventType.sandbox_hibernated) < kinds.index(EventType.sandbox_woken)
    statuses = [e.data["status"] for e in stubs.events if e.type == EventType.session_status]
    assert statuses[:5] == ["ready", "hibernated", "waking", "ready", "busy"]
    assert stubs.destroyed == stubs.provisioned


async def test_cancelling_a_task_while_the_model_plans_does_not_wait_for_it(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    stubs.thinking.clear()  # the model never answers
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "say hello")
        await until(lambda: stubs.task_statuses().get(ref.id) == "planning")
        cancelled = await asyncio.wait_for(
            handle.execute_update(
                "cancel_task", result_type=TaskRef, arg=TaskControl(task_id=ref.id)
            ),
            10,
        )
        assert cancelled.status == "cancelled"
        stubs.thinking.set()
        await end(handle)
    assert stubs.commands == []


async def test_a_modification_during_the_last_step_is_planned_before_verifying(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    stubs.plans = [["wait"], ["echo changed"]]
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "do something")
        await until(lambda: stubs.commands == ["wait"])
        change = TaskModification(task_id=ref.id, instruction="say changed instead")
        await handle.execute_update("modify_task", result_type=TaskRef, arg=change)
        stubs.release.set()
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
    assert stubs.commands == ["wait", "echo changed"]
    assert stubs.plan_requests[1].notes == ["say changed instead"]
    final = [e.data for e in stubs.events if e.type == EventType.task_status][-1]
    assert final["result"] == "ran echo changed"


async def test_a_session_claims_a_warm_vm_and_creates_one_cold_when_the_pool_is_empty(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    stubs.pool = ["warm-1"]
    session = params(stubs).model_copy(update={"warm_pool": True})
    async with running(env, stubs, session) as handle:
        ref = await submit(env.client, handle.id, "$ echo warm")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        state = await handle.query(SessionWorkflow.state)
        assert state.sandbox is not None and state.sandbox.id == "warm-1"
        await end(handle)
        save_history("pool-claim", await handle.fetch_history())
    assert stubs.claimed == stubs.assigned == stubs.destroyed == ["warm-1"]
    assert stubs.provisioned == []  # nothing created cold
    ready = next(e.data for e in stubs.events if e.type == EventType.sandbox_ready)
    assert ready["sandbox_id"] == "warm-1" and ready["pooled"] is True

    cold = Stubs()  # an empty pool: a cold create, never an error
    async with running(env, cold, params(cold).model_copy(update={"warm_pool": True})) as handle:
        await until(lambda: EventType.sandbox_ready in cold.types())
        await end(handle)
    assert len(cold.provisioned) == 1 and cold.destroyed == cold.provisioned
    assert cold.claimed == [] and "pooled" not in cold.events[0].data


async def test_an_end_during_the_claim_destroys_the_claimed_vm(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    stubs.pool = ["warm-1"]
    stubs.pool_open.clear()  # the claim is under way when the session ends
    session = params(stubs).model_copy(update={"warm_pool": True})
    async with running(env, stubs, session) as handle:
        await until(lambda: stubs.claims == 1)
        await handle.cancel()
        await asyncio.sleep(0.3)
        assert stubs.destroyed == []  # the end waits for the claim...
        stubs.pool_open.set()
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 10)
    # ...and destroys what it handed out, without ever creating one cold.
    assert stubs.claimed == stubs.destroyed == ["warm-1"] and stubs.provisioned == []
    assert stubs.events[-1].data == {"status": "ended"}


async def update(handle: WorkflowHandle, name: str, argument: Any) -> TaskRef:  # type: ignore[type-arg]
    """An update, answered within ten seconds: one that wedges the session never is."""
    ref: TaskRef = await asyncio.wait_for(
        handle.execute_update(name, argument, result_type=TaskRef), 10
    )
    return ref


async def refusal(handle: WorkflowHandle, name: str, argument: Any) -> str:  # type: ignore[type-arg]
    """Why an update was refused (or failed), within ten seconds."""
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await update(handle, name, argument)
    return str(refused.value.cause)


async def test_a_key_resent_after_its_task_is_forgotten_is_answered(
    env: WorkflowEnvironment,
) -> None:
    """As a run continued from a long session carries it: the most finished tasks it
    remembers, a key of the oldest, and a key of a task forgotten by a run before."""
    stubs = Stubs()
    session = params(stubs)
    sandbox = SandboxInfo(
        id="up", session_id=session.session_id, provider="stub", host_id="h",
        task_queue=stubs.queue, template="default", handle="h1",
    )  # fmt: skip
    finished = {f"old-{i}": TaskStatus.succeeded for i in range(100)}
    carried = Carried(
        sandbox=sandbox, finished=finished, submitted={"k-old": "old-0", "k-lost": "lost"}
    )
    async with running(env, stubs, session.model_copy(update={"carried": carried})) as handle:
        lost = await refusal(handle, "submit_task", TaskSubmission(prompt="$ x", key="k-lost"))
        assert "task lost, queued with this Idempotency-Key, has finished" in lost
        again = await update(handle, "submit_task", TaskSubmission(prompt="$ x", key="k-old"))
        assert (again.id, again.status) == ("old-0", "succeeded")
        new = await update(handle, "submit_task", TaskSubmission(prompt="$ echo new", key="k"))
        await until(lambda: stubs.task_statuses().get(new.id) == "succeeded")
        # old-0 is forgotten now, and its key with it: the key queues a task of its own.
        state = await handle.query(SessionWorkflow.state)
        assert "old-0" not in state.finished and len(state.finished) == 100
        fresh = await update(handle, "submit_task", TaskSubmission(prompt="$ echo 2", key="k-old"))
        assert fresh.id != "old-0"
        await until(lambda: stubs.task_statuses().get(fresh.id) == "succeeded")
        await end(handle)
    assert stubs.commands == ["echo new", "echo 2"]


@workflow.defn(name="FaultySession")
class FaultySession(SessionWorkflow):
    """A session with a bug in its modify handler's path."""

    def event(self, type: EventType, **data: Any) -> NewEvent:
        if type == EventType.task_modified:
            raise RuntimeError("a bug")
        return super().event(type, **data)

    @workflow.run
    async def run(self, params: SessionInput) -> Any:
        return await super().run(params)


async def test_an_unexpected_error_in_an_update_fails_that_update_only(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs), kind=FaultySession) as handle:
        ref = await submit(env.client, handle.id, "$ wait")
        await until(lambda: stubs.commands == ["wait"])
        change = TaskModification(task_id=ref.id, instruction="say other")
        why = await refusal(handle, "modify_task", change)
        assert "modify_task failed unexpectedly (RuntimeError: a bug)" in why
        # The session still answers, runs and ends.
        stubs.release.set()
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
    assert stubs.destroyed == stubs.provisioned


async def test_a_resumed_session_replaces_a_dead_machine_with_a_new_one(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    session = params(stubs)
    kept = SandboxInfo(
        id="kept", session_id="before", provider="stub", host_id="h",
        task_queue=stubs.queue, template="default", handle="disk",
    )  # fmt: skip
    async with running(env, stubs, session.model_copy(update={"restore": kept})) as handle:
        await until(lambda: EventType.sandbox_restored in stubs.types())
        restored = (await handle.query(SessionWorkflow.state)).sandbox
        assert restored is not None
        death = SandboxDeath(sandbox_id=restored.id, detail="gone")
        await handle.signal(SessionWorkflow.sandbox_died, death)
        ref = await submit(env.client, handle.id, "$ echo on a new machine")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("restore-then-replace", await handle.fetch_history())
    assert stubs.restored == ["kept"] and len(stubs.provisioned) == 1
    assert stubs.destroyed == [restored.id, *stubs.provisioned]


async def test_a_paused_task_lets_the_session_hibernate(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    session = params(stubs).model_copy(update={"hibernate_after_s": 0.5})
    async with running(env, stubs, session) as handle:
        ref = await submit(env.client, handle.id, "$ wait\n$ echo after")
        await until(lambda: stubs.commands == ["wait"])
        control = TaskControl(task_id=ref.id)
        await update(handle, "pause_task", control)
        stubs.release.set()
        await until(lambda: EventType.sandbox_hibernated in stubs.types())
        assert (await handle.query(SessionWorkflow.state)).status == "hibernated"
        await update(handle, "resume_task", control)
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("pause-hibernate", await handle.fetch_history())
    (sandbox,) = stubs.provisioned
    assert stubs.power[:2] == [f"hibernate {sandbox}", f"wake {sandbox}"]
    assert stubs.commands == ["wait", "echo after"]
    statuses = [e.data["status"] for e in stubs.events if e.type == EventType.session_status]
    assert statuses[:5] == ["ready", "busy", "hibernated", "waking", "busy"]


class SlowPower(Stubs):
    """Its ``slow`` power activity (hibernate or wake) lasts until the test opens it: a
    control or the session's end can come meanwhile."""

    def __init__(self, slow: str) -> None:
        super().__init__()
        self.slow = slow
        self.in_power = asyncio.Event()
        self.power_open = asyncio.Event()

    async def hold(self, what: str, sandbox: SandboxInfo) -> None:
        if what == self.slow:
            self.in_power.set()
            while not self.power_open.is_set():
                activity.heartbeat()
                await asyncio.sleep(0.05)
        self.power.append(f"{what} {sandbox.id}")

    @activity.defn(name="HibernateSandbox")
    async def hibernate(self, sandbox: SandboxInfo) -> None:
        await self.hold("hibernate", sandbox)

    @activity.defn(name="WakeSandbox")
    async def wake(self, sandbox: SandboxInfo) -> None:
        await self.hold("wake", sandbox)


async def test_ending_while_a_paused_tasks_sandbox_hibernates_ends_the_session(
    env: WorkflowEnvironment,
) -> None:
    """Durability review: the hibernate the end interrupted swallowed the cancellation, and
    the paused session waited on until its idle timeout with its machine up."""
    stubs = SlowPower(slow="hibernate")
    session = params(stubs).model_copy(update={"hibernate_after_s": 0.5})
    async with running(env, stubs, session) as handle:
        ref = await submit(env.client, handle.id, "$ wait\n$ echo never")
        await until(lambda: stubs.commands == ["wait"])
        await update(handle, "pause_task", TaskControl(task_id=ref.id))
        stubs.release.set()
        await asyncio.wait_for(stubs.in_power.wait(), 10)
        await handle.cancel()  # the user's DELETE
        with contextlib.suppress(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 15)
    assert stubs.destroyed == stubs.provisioned
    assert stubs.task_statuses()[ref.id] == "cancelled"
    assert stubs.commands == ["wait"]


async def test_a_pause_while_the_sandbox_wakes_holds_the_next_step(
    env: WorkflowEnvironment,
) -> None:
    """Durability review: a pause sent while a resumed task's sandbox woke was answered
    "paused", yet the next step ran."""
    stubs = SlowPower(slow="wake")
    session = params(stubs).model_copy(update={"hibernate_after_s": 0.5})
    async with running(env, stubs, session) as handle:
        ref = await submit(env.client, handle.id, "$ wait\n$ echo after")
        await until(lambda: stubs.commands == ["wait"])
        control = TaskControl(task_id=ref.id)
        await update(handle, "pause_task", control)
        stubs.release.set()
        await until(lambda: EventType.sandbox_hibernated in stubs.types())
        await update(handle, "resume_task", control)
        await asyncio.wait_for(stubs.in_power.wait(), 10)  # waking, slowly
        await update(handle, "pause_task", control)
        stubs.power_open.set()
        await until(lambda: len(stubs.power) == 2)
        await asyncio.sleep(1.5)
        assert stubs.commands == ["wait"], "a step ran while its task was paused"
        await update(handle, "resume_task", control)
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
    assert stubs.commands == ["wait", "echo after"]


async def test_a_task_cancelled_while_the_sandbox_wakes_leaves_the_session_answering(
    env: WorkflowEnvironment,
) -> None:
    """Durability review: the one queued task cancelled while its sandbox woke left an empty
    queue to pop, and every workflow task failed from then on."""
    stubs = SlowPower(slow="wake")
    session = params(stubs).model_copy(update={"hibernate_after_s": 0.5})
    async with running(env, stubs, session) as handle:
        await until(lambda: EventType.sandbox_hibernated in stubs.types())
        ref = await submit(env.client, handle.id, "$ echo never")
        await asyncio.wait_for(stubs.in_power.wait(), 10)  # waking, slowly
        await update(handle, "cancel_task", TaskControl(task_id=ref.id))
        stubs.power_open.set()
        after = await submit(env.client, handle.id, "$ echo after")
        await until(lambda: stubs.task_statuses().get(after.id) == "succeeded")
        history = await handle.fetch_history()
        await end(handle)
    assert not [e for e in history.events if e.HasField("workflow_task_failed_event_attributes")]
    assert stubs.commands == ["echo after"]


async def test_a_paused_task_ends_at_the_idle_timeout(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    session = params(stubs).model_copy(update={"idle_timeout_s": 1.0})
    async with running(env, stubs, session) as handle:
        ref = await submit(env.client, handle.id, "$ wait\n$ echo never")
        await until(lambda: stubs.commands == ["wait"])
        await update(handle, "pause_task", TaskControl(task_id=ref.id))
        stubs.release.set()
        state = await asyncio.wait_for(handle.result(), 10)
        save_history("pause-idle", await handle.fetch_history())
    assert state.status == "ended" and stubs.task_statuses() == {ref.id: "cancelled"}
    assert stubs.commands == ["wait"] and stubs.destroyed == stubs.provisioned


async def test_a_paused_task_continues_as_new_paused(short_env: WorkflowEnvironment) -> None:
    env = short_env
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "$ wait\n$ echo after")
        await until(lambda: stubs.commands == ["wait"])
        first_run = handle.result_run_id
        control = TaskControl(task_id=ref.id)
        await update(handle, "pause_task", control)
        stubs.release.set()
        # Signals of another machine's death: ignored, but they grow the history.
        for _ in range(SHORT_HISTORY // 3):
            await handle.signal(
                SessionWorkflow.sandbox_died, SandboxDeath(sandbox_id="other", detail="x")
            )
        latest = env.client.get_workflow_handle(handle.id)
        async with asyncio.timeout(10):
            while (await latest.describe()).run_id == first_run:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        state = await latest.query(SessionWorkflow.state)
        assert [t.status for t in state.tasks] == ["paused"] and stubs.commands == ["wait"]
        save_history("pause-continue-as-new", await env.client.get_workflow_handle(
            handle.id, run_id=first_run).fetch_history())  # fmt: skip
        await update(latest, "resume_task", control)
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(latest)
    assert stubs.commands == ["wait", "echo after"]


async def test_every_modification_during_a_step_is_taken_in_order(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    stubs.plans = [["wait"]]
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "do something")
        await until(lambda: stubs.commands == ["wait"])
        for instruction in ("say first", "say second"):
            change = TaskModification(task_id=ref.id, instruction=instruction)
            await update(handle, "modify_task", change)
        stubs.release.set()
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("modify-twice", await handle.fetch_history())
    assert [r.instruction for r in stubs.plan_requests[1:]] == ["say first", "say second"]
    assert stubs.plan_requests[-1].notes == ["say first", "say second"]
    assert stubs.commands == ["wait", "echo second"]


async def test_a_task_takes_a_bounded_number_and_size_of_modifications(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "$ wait")
        await until(lambda: stubs.commands == ["wait"])
        long = "say " + "x" * 19_996
        for _ in range(2):
            await update(handle, "modify_task", TaskModification(task_id=ref.id, instruction=long))
        why = await refusal(
            handle, "modify_task", TaskModification(task_id=ref.id, instruction="say more")
        )
        assert "modifications would come to 40008 characters, past the 40000" in why
        await update(handle, "cancel_task", TaskControl(task_id=ref.id))
        other = await submit(env.client, handle.id, "$ wait")
        await until(lambda: stubs.commands == ["wait", "wait"])
        for n in range(10):
            change = TaskModification(task_id=other.id, instruction=f"say {n}")
            await update(handle, "modify_task", change)
        why = await refusal(handle, "modify_task", change)
        assert f"task {other.id} has 10 modifications already, the most a task takes" in why
        await end(handle)


async def test_a_task_too_large_to_carry_fails_and_the_session_goes_on(
    short_env: WorkflowEnvironment,
) -> None:
    env = short_env
    stubs = Stubs()
    stubs.plans = [[f"echo {i} {'x' * 700}" for i in range(45)]]
    session = params(stubs).model_copy(update={"max_carried_bytes": 20_000})
    async with running(env, stubs, session) as handle:
        big = await submit(env.client, handle.id, "many long steps")
        await until(lambda: stubs.task_statuses().get(big.id) == "failed")
        first_run = handle.result_run_id
        after = await submit(env.client, handle.id, "$ echo after")
        await until(lambda: stubs.task_statuses().get(after.id) == "succeeded")
        latest = env.client.get_workflow_handle(handle.id)
        assert (await latest.describe()).run_id != first_run, "never continued as new"
        save_history("carried-too-large", await env.client.get_workflow_handle(
            handle.id, run_id=first_run).fetch_history())  # fmt: skip
        await end(latest)
    failed = next(
        e.data
        for e in stubs.events
        if e.type == EventType.task_status and e.data["status"] == "failed"
    )
    assert "past the 20000 bytes a session carries to its next run" in failed["error"]


async def test_a_session_keeps_its_status_search_attribute_current(
    env: WorkflowEnvironment,
) -> None:
    """An operator filters sessions in the Temporal UI by user and status: the status the
    session shows is its own, upserted at each change."""
    stubs = Stubs()
    user = f"user-{uuid.uuid4().hex[:8]}"
    session = params(stubs).model_copy(update={"search_attributes": True})
    attributes = search.at_start(user, "default", "host-a", "provisioning")

    async def listed(query: str) -> list[str]:
        return [w.id async for w in env.client.list_workflows(query)]

    async with running(env, stubs, session, search_attributes=attributes) as handle:
        ref = await submit(env.client, handle.id, "$ echo found")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        async with asyncio.timeout(20):  # visibility follows the history within moments
            while await listed(f'BerthUser="{user}" AND BerthStatus="ready"') != [handle.id]:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        await end(handle)
        save_history("search-attributes", await handle.fetch_history())
    described = await handle.describe()
    assert described.typed_search_attributes.get(search.STATUS) == "ended"
    assert described.typed_search_attributes.get(search.HOST) == "host-a"
    assert await listed(f'BerthUser="{user}" AND BerthTemplate="default"') == [handle.id]


async def test_without_the_flag_a_session_upserts_nothing(env: WorkflowEnvironment) -> None:
    """A namespace without the attributes (the API leaves the flag off) runs sessions as
    before: an upsert there would fail every workflow task."""
    stubs = Stubs()
    async with running(env, stubs, params(stubs)) as handle:
        ref = await submit(env.client, handle.id, "$ echo plain")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        history = await handle.fetch_history()
    # The SDK itself upserts TemporalChangeVersion when a patch is first met; that one the
    # server always has.
    upserted = {
        key
        for e in history.events
        if e.HasField("upsert_workflow_search_attributes_event_attributes")
        for key in e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields  # noqa: E501
    }
    assert upserted <= {"TemporalChangeVersion"}


@contextlib.asynccontextmanager
async def two_hosts(
    env: WorkflowEnvironment, here: Stubs, there: Stubs, first: HostState, first_id: str
) -> AsyncIterator[None]:
    """The fleet as the session's ReadFleet finds it: its own host (``here``'s queue) in
    state ``first``, and an empty active host "b" whose worker (``there``) runs sessions."""
    own = Candidate(
        id=first_id, state=first, templates=("default",), vcpus=2,
        memory_available_mb=4096, load1=0.0, machines=1, task_queue=here.queue,
    )  # fmt: skip
    other = own.model_copy(update={"id": "b", "state": HostState.active, "machines": 0,
                                   "task_queue": there.queue})  # fmt: skip

    @activity.defn(name="ReadFleet")
    async def read_fleet(template: str) -> Fleet:
        return Fleet(hosts=[own, other], memory_mb=512)

    async with (
        Worker(env.client, task_queue=FLEET_TASK_QUEUE, activities=[read_fleet]),
        Worker(
            env.client, task_queue=there.queue, workflows=[SessionWorkflow],
            activities=there.all(),
        ),
    ):  # fmt: skip
        yield


async def test_a_placed_session_says_where_and_moves_when_its_host_is_lost(
    env: WorkflowEnvironment,
) -> None:
    """Placed by the API, the session says where and why (session.placed). Its host lost,
    the machine is left (not destroyed: nothing there answers), the session is placed anew
    from the registry, gets a machine on the other host, and continues as new onto that
    host's queue, where its next task runs."""
    here, there = Stubs(), Stubs()
    session = params(here).model_copy(update={"placed_host": "a", "placed_why": "the test's"})
    async with (
        two_hosts(env, here, there, HostState.lost, "a"),
        running(env, here, session) as handle,
    ):
        await until(lambda: EventType.sandbox_ready in here.types())
        (dead,) = here.provisioned
        death = SandboxDeath(sandbox_id=dead, detail="host a is lost", host_lost="a")
        await handle.signal(SessionWorkflow.sandbox_died, death)
        await until(lambda: len(there.provisioned) == 1)
        latest = env.client.get_workflow_handle(handle.id)
        async with asyncio.timeout(10):
            while (await latest.describe()).task_queue != there.queue:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        ref = await submit(env.client, handle.id, "$ echo moved")
        await until(lambda: there.task_statuses().get(ref.id) == "succeeded")
        first = env.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
        save_history("host-lost-move", await first.fetch_history(), HISTORIES.parent / "v6")
        await end(latest)
    placed = [e.data for e in here.events if e.type == EventType.session_placed]
    assert placed[0] == {"host_id": "a", "why": "the test's"}
    assert placed[1]["host_id"] == "b" and placed[1]["why"].startswith("moved: ")
    (lost,) = [e.data for e in here.events if e.type == EventType.host_lost]
    assert lost["sandbox_id"] == dead and "files" in lost["detail"]
    assert here.destroyed == [] and there.commands == ["echo moved"]
    assert there.destroyed == there.provisioned


async def test_a_session_moves_off_a_draining_host_with_its_disk(env: WorkflowEnvironment) -> None:
    """``host drain --move``: between tasks, the machine ends keeping its disk, the session
    is placed anew (never on the draining host), its disk restored on a machine there, and
    it continues as new onto that host's queue."""
    here, there = Stubs(), Stubs()
    async with (
        two_hosts(env, here, there, HostState.draining, "h"),
        running(env, here, params(here)) as handle,
    ):
        ref = await submit(env.client, handle.id, "$ echo before")
        await until(lambda: here.task_statuses().get(ref.id) == "succeeded")
        (old,) = here.provisioned
        await handle.signal(SessionWorkflow.move_off_host, "h")
        await until(lambda: there.restored == [old])
        latest = env.client.get_workflow_handle(handle.id)
        async with asyncio.timeout(10):
            while (await latest.describe()).task_queue != there.queue:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        first = env.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
        save_history("drain-move", await first.fetch_history(), HISTORIES.parent / "v6")
        await end(latest)
    assert here.preserved == [old] and old not in here.destroyed + there.destroyed
    (placed,) = [e.data for e in here.events if e.type == EventType.session_placed]
    assert placed["host_id"] == "b" and placed["why"].startswith("moved off draining host h")
    restored = [e.data for e in here.events if e.type == EventType.sandbox_restored]
    assert restored and restored[0]["preserved_id"] == old
