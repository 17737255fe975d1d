"""SessionWorkflow: one per session, from its sandbox's birth to its destruction.

Deterministic orchestration only. Every side effect is an activity: provisioning and
destroying the sandbox and running steps (on the sandbox's host queue), planning, and
recording progress in the event log.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.planning import PlanningActivities
    from activities.progress import ProgressActivities
    from activities.sandbox import SandboxActivities
    from sandboxes.models import SandboxInfo, StepOutcome
    from store.models import SessionStatus, TaskStatus
    from workflows.models import (
        DoneStep,
        PlanRequest,
        ProgressEvent,
        SandboxRequest,
        SessionInput,
        SessionState,
        StepRequest,
        TaskControl,
        TaskModification,
        TaskRef,
        TaskState,
        TaskSubmission,
    )

MAX_QUEUED_TASKS = 20
FINISHED = (TaskStatus.succeeded, TaskStatus.failed, TaskStatus.cancelled)

RECORD_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=20)


def workflow_id(session_id: str) -> str:
    return f"session-{session_id}"


def failure_message(error: BaseException) -> str:
    """The innermost cause's message: what actually went wrong, for people."""
    while isinstance(error, ActivityError) and error.cause is not None:
        error = error.cause
    return str(error) or type(error).__name__


@workflow.defn(name="SessionWorkflow")
class SessionWorkflow:
    @workflow.init
    def __init__(self, params: SessionInput) -> None:
        self.params = params
        self.status = SessionStatus.provisioning
        self.sandbox: SandboxInfo | None = params.sandbox
        self.tasks: dict[str, TaskState] = {t.id: t for t in params.queued}
        self.queue: list[str] = [t.id for t in params.queued]
        self.current: TaskState | None = None
        self.paused = False
        self.cancelling = False
        self.instructions: dict[str, str] = {}
        self.step: workflow.ActivityHandle[StepOutcome] | None = None
        self.events = 0

    # ---- the session's life

    @workflow.run
    async def run(self, params: SessionInput) -> SessionState:
        ended = SessionStatus.ended
        error: str | None = None
        try:
            if self.sandbox is None:
                await self.provision()
            await self.set_status(SessionStatus.ready)
            while True:
                if not await self.next_task():
                    break  # idle for too long: the session ends itself
                await self.run_task(self.tasks[self.queue.pop(0)])
                if workflow.info().is_continue_as_new_suggested():
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    workflow.continue_as_new(
                        params.model_copy(
                            update={
                                "sandbox": self.sandbox,
                                "queued": [self.tasks[i] for i in self.queue],
                            }
                        )
                    )
        except asyncio.CancelledError:
            raise  # the user ended the session; the finally below cleans up
        except Exception as exc:
            ended, error = SessionStatus.failed, failure_message(exc)
            raise
        finally:
            await self.clean_up(ended, error)
        return self.state()

    async def next_task(self) -> bool:
        """Wait for a queued task; False once the session has been idle too long."""
        try:
            await workflow.wait_condition(
                lambda: bool(self.queue),
                timeout=timedelta(seconds=self.params.idle_timeout_s),
                timeout_summary="idle timeout",
            )
        except TimeoutError:
            return False
        return True

    async def provision(self) -> None:
        self.sandbox = await workflow.execute_activity_method(
            SandboxActivities.provision,
            SandboxRequest(session_id=self.params.session_id, template=self.params.template),
            task_queue=self.params.host_task_queue,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=3),
            summary=f"provision a {self.params.template!r} sandbox",
        )
        await self.record(
            "sandbox.ready",
            {
                "sandbox_id": self.sandbox.id,
                "provider": self.sandbox.provider,
                "host_id": self.sandbox.host_id,
                "template": self.sandbox.template,
                "handle": self.sandbox.handle,
            },
        )

    async def clean_up(self, status: SessionStatus, error: str | None) -> None:
        """Runs however the session ends: cancelled, idle, or failed."""
        if self.step is not None and not self.step.done():
            self.step.cancel()
        for task_id in self.queue:
            await self.set_task(self.tasks[task_id], TaskStatus.cancelled, error="session ended")
        self.queue.clear()
        if self.sandbox is not None:
            await workflow.execute_activity_method(
                SandboxActivities.destroy,
                self.sandbox,
                task_queue=self.sandbox.task_queue,
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=RetryPolicy(maximum_attempts=5),
                summary="destroy the sandbox",
            )
            await self.record("sandbox.destroyed", {"sandbox_id": self.sandbox.id})
            self.sandbox = None
        await self.set_status(status, error)
        await workflow.wait_condition(workflow.all_handlers_finished)

    # ---- one task

    async def run_task(self, task: TaskState) -> None:
        self.current, self.paused, self.cancelling = task, False, False
        await self.set_status(SessionStatus.busy)
        try:
            await self.set_task(task, TaskStatus.planning)
            await self.replan(task, [], self.instructions.pop(task.id, None))
            await self.set_task(task, TaskStatus.running)
            done: list[DoneStep] = []
            index = 0
            while index < len(task.steps):
                await workflow.wait_condition(lambda: not self.paused or self.cancelling)
                if self.cancelling:
                    break
                instruction = self.instructions.pop(task.id, None)
                if instruction is not None:
                    await self.replan(task, done, instruction, first=index)
                    continue
                outcome = await self.run_step(task, index)
                if outcome is None:
                    break  # cancelled while it ran
                done.append(DoneStep(step=task.steps[index], outcome=outcome))
                if not outcome.ok:
                    why = outcome.error or (
                        "timed out" if outcome.timed_out else f"exited with {outcome.exit_code}"
                    )
                    raise ApplicationError(
                        f"step {index + 1} ({task.steps[index].describe()}) {why}"
                    )
                index += 1
            if self.cancelling:
                await self.set_task(task, TaskStatus.cancelled)
            else:
                result = done[-1].outcome.output_tail if done else ""
                await self.set_task(task, TaskStatus.succeeded, result=result)
        except (ActivityError, ApplicationError) as exc:
            await self.set_task(task, TaskStatus.failed, error=failure_message(exc))
        finally:
            task.current = None
            self.current = None
        await self.set_status(SessionStatus.ready)

    async def replan(
        self, task: TaskState, done: list[DoneStep], instruction: str | None, first: int = 0
    ) -> None:
        plan = await workflow.execute_activity_method(
            PlanningActivities.plan,
            PlanRequest(task_id=task.id, prompt=task.prompt, instruction=instruction, done=done),
            start_to_close_timeout=timedelta(minutes=3),
            retry_policy=RetryPolicy(maximum_attempts=3),
            summary="revise the plan" if instruction else "plan the task",
        )
        task.steps = task.steps[:first] + plan.steps
        await self.record(
            "task.plan",
            {
                "task_id": task.id,
                "first": first,
                "steps": [s.model_dump() for s in plan.steps],
            },
        )

    async def run_step(self, task: TaskState, index: int) -> StepOutcome | None:
        """Run a step in the sandbox; None if the task was cancelled meanwhile."""
        assert self.sandbox is not None
        step = task.steps[index]
        task.current = index
        await self.record(
            "step.started", {"task_id": task.id, "index": index, "step": step.model_dump()}
        )
        handle = workflow.start_activity_method(
            SandboxActivities.run_step,
            StepRequest(
                sandbox=self.sandbox,
                task_id=task.id,
                index=index,
                step=step,
                timeout_s=self.params.step_timeout_s,
            ),
            task_queue=self.sandbox.task_queue,
            start_to_close_timeout=timedelta(seconds=self.params.step_timeout_s + 120),
            heartbeat_timeout=timedelta(seconds=20),
            retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=["ValueError"]),
            summary=f"step {index + 1}/{len(task.steps)}: {step.describe()[:80]}",
        )
        self.step = handle
        await workflow.wait_condition(lambda: handle.done() or self.cancelling)
        self.step = None
        outcome: StepOutcome | None = None
        error: str | None = None
        if self.cancelling and not handle.done():
            handle.cancel()
        try:
            outcome = await handle
        except (ActivityError, asyncio.CancelledError) as exc:
            if not self.cancelling:
                raise
            error = failure_message(exc)
        status = "cancelled" if outcome is None else ("succeeded" if outcome.ok else "failed")
        await self.record(
            "step.finished",
            {
                "task_id": task.id,
                "index": index,
                "step": step.model_dump(),
                "status": status,
                "exit_code": outcome.exit_code if outcome else None,
                "error": (outcome.error if outcome else error),
            },
        )
        return outcome

    # ---- updates and queries

    @workflow.update(name="submit_task")
    async def submit_task(self, submission: TaskSubmission) -> TaskRef:
        task = TaskState(id=str(workflow.uuid4()), prompt=submission.prompt)
        self.tasks[task.id] = task
        await self.record("task.queued", {"task_id": task.id, "prompt": task.prompt})
        self.queue.append(task.id)
        return TaskRef(id=task.id, status=task.status)

    @submit_task.validator
    def check_submit(self, submission: TaskSubmission) -> None:
        if self.status in (SessionStatus.ended, SessionStatus.failed):
            raise ValueError("the session has ended")
        if len(self.queue) >= MAX_QUEUED_TASKS:
            raise ValueError(f"{MAX_QUEUED_TASKS} tasks are queued already; wait for some to end")

    @workflow.update(name="pause_task")
    async def pause_task(self, control: TaskControl) -> TaskRef:
        self.paused = True
        return await self.set_task(self.tasks[control.task_id], TaskStatus.paused)

    @pause_task.validator
    def check_pause(self, control: TaskControl) -> None:
        self.running_task(control.task_id, TaskStatus.planning, TaskStatus.running)

    @workflow.update(name="resume_task")
    async def resume_task(self, control: TaskControl) -> TaskRef:
        self.paused = False
        return await self.set_task(self.tasks[control.task_id], TaskStatus.running)

    @resume_task.validator
    def check_resume(self, control: TaskControl) -> None:
        self.running_task(control.task_id, TaskStatus.paused)

    @workflow.update(name="cancel_task")
    async def cancel_task(self, control: TaskControl) -> TaskRef:
        task = self.tasks[control.task_id]
        if task.id in self.queue:
            self.queue.remove(task.id)
            return await self.set_task(task, TaskStatus.cancelled)
        self.cancelling = True
        await workflow.wait_condition(lambda: task.status in FINISHED)
        return TaskRef(id=task.id, status=task.status)

    @cancel_task.validator
    def check_cancel(self, control: TaskControl) -> None:
        task = self.known_task(control.task_id)
        if task.status in FINISHED:
            raise ValueError(f"task {task.id} has {task.status.value} already")

    @workflow.update(name="modify_task")
    async def modify_task(self, change: TaskModification) -> TaskRef:
        task = self.tasks[change.task_id]
        self.instructions[task.id] = change.instruction
        await self.record("task.modified", {"task_id": task.id, "instruction": change.instruction})
        return TaskRef(id=task.id, status=task.status)

    @modify_task.validator
    def check_modify(self, change: TaskModification) -> None:
        self.check_cancel(TaskControl(task_id=change.task_id))

    @workflow.query(name="state")
    def state(self) -> SessionState:
        return SessionState(
            session_id=self.params.session_id,
            status=self.status,
            sandbox=self.sandbox,
            tasks=list(self.tasks.values()),
        )

    def known_task(self, task_id: str) -> TaskState:
        task = self.tasks.get(task_id)
        if task is None:
            raise ValueError(f"no task {task_id} in this session")
        return task

    def running_task(self, task_id: str, *allowed: TaskStatus) -> None:
        task = self.known_task(task_id)
        if task is not self.current or task.status not in allowed:
            raise ValueError(f"task {task_id} is {task.status.value}, not {allowed[0].value}")

    # ---- progress

    async def set_status(self, status: SessionStatus, error: str | None = None) -> None:
        self.status = status
        data: dict[str, Any] = {"status": status.value}
        if error:
            data["error"] = error
        await self.record("session.status", data)

    async def set_task(self, task: TaskState, status: TaskStatus, **extra: str | None) -> TaskRef:
        task.status = status
        task.result = extra.get("result", task.result)
        task.error = extra.get("error", task.error)
        await self.record("task.status", {"task_id": task.id, "status": status.value, **extra})
        return TaskRef(id=task.id, status=status)

    async def record(self, type: str, data: dict[str, Any]) -> None:
        # The key makes a retried RecordProgress a no-op; the counter is replay-safe.
        self.events += 1
        key = f"{workflow.info().run_id}/{self.events}"
        await workflow.execute_activity_method(
            ProgressActivities.record,
            ProgressEvent(session_id=self.params.session_id, type=type, data=data, key=key),
            start_to_close_timeout=timedelta(seconds=15),
            retry_policy=RECORD_RETRY,
            summary=type,
        )
