"""SessionWorkflow: one per session, from its sandbox's birth to its destruction.

Deterministic orchestration only. Every side effect is an activity: provisioning and
destroying the sandbox and running steps (on the sandbox's host queue), planning prose,
and recording progress in the event log (a local activity, batched, so a step costs no
more history than its own RunStep).

A long session continues as new between steps, carrying everything it is (sandbox, tasks,
the running task's position); only a real end (cancelled, idle, failed) cleans up.

Beside it: what a failed activity means (workflows/failures.py) and how long each activity
may take and how it is retried (workflows/options.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.checkpoints import CheckpointActivities
    from activities.fleet import FleetActivities
    from activities.models import (
        FLEET_TASK_QUEUE,
        CheckpointRequest,
        ClaimRequest,
        DoneStep,
        ForkRequest,
        ModelAnswer,
        Plan,
        PlanRequest,
        ProgressBatch,
        RestoreRequest,
        SandboxRequest,
        StepRequest,
        TaskVerdict,
        VerifyRequest,
        brief_step,
    )
    from activities.planning import PlanningActivities
    from activities.progress import ProgressActivities
    from activities.sandbox import SandboxActivities, step_key
    from activities.vm import VmActivities
    from sandboxes.models import Health, SandboxInfo, StepOutcome
    from store.events import EventType, NewEvent
    from store.models import SessionStatus, TaskStatus
    from telemetry import tracing
    from workflows import checkpoints, options, search
    from workflows.failures import (
        REFUSED_EXIT,
        answering,
        died,
        failure_message,
        refused,
        timed_out,
        unavailable,
    )
    from workflows.keys import EventKeys
    from workflows.models import (
        MAX_CHECKPOINTS,
        MAX_NOTES,
        MAX_NOTES_CHARS,
        Carried,
        CheckpointAsk,
        CheckpointControl,
        CheckpointRef,
        RollbackAsk,
        RollbackRef,
        SandboxDeath,
        SessionInput,
        SessionState,
        TaskControl,
        TaskModification,
        TaskRef,
        TaskState,
        TaskSubmission,
    )
    from workflows.placement import Placement, place
    from workflows.plans import has_service_lines, is_step_plan, step_plan, user_plan

Request = TypeVar("Request", PlanRequest, VerifyRequest)
Making = TypeVar("Making", SandboxRequest, RestoreRequest, ForkRequest)
Answer = TypeVar("Answer", Plan, TaskVerdict)

MAX_QUEUED_TASKS = 20
FINISHED = (TaskStatus.succeeded, TaskStatus.failed, TaskStatus.cancelled)
# Kept per task for the planner's context, and finished tasks remembered across runs.
RECENT_STEPS = 10
REMEMBERED_TASKS = 100
# Submissions' keys: one per remembered or unfinished task, so a key is forgotten only with
# its task (see finish), and a key the session still has always names a task it knows.
REMEMBERED_KEYS = REMEMBERED_TASKS + MAX_QUEUED_TASKS + 1

# How long ending a session waits for the running command's kill (and then, see
# options.DESTROY, for the sandbox).
STOP_STEP_TIMEOUT = timedelta(seconds=60)
# The longest pause before replacing a machine that died again (see recover()).
MAX_REPLACE_BACKOFF_S = 60.0
# A session whose host is lost, with no other host that has room, asks again this often,
# this many times, then fails saying so.
PLACE_AGAIN_EVERY = timedelta(seconds=15)
PLACE_AGAIN_TRIES = 8


class Idle(Exception):
    """The session has been idle (no task, or its task paused) for its idle timeout."""


def answered_by(answer: ModelAnswer) -> dict[str, Any]:
    """Which provider answered, and whether from its cache (neither for a written plan)."""
    return {"provider": answer.provider, "cached": answer.cached if answer.provider else None}


@workflow.defn(name="SessionWorkflow")
class SessionWorkflow:
    @workflow.init
    def __init__(self, params: SessionInput) -> None:
        carried = params.carried
        self.params = params
        self.sandbox: SandboxInfo | None = carried.sandbox if carried else None
        # The id of the machine being made (created cold, or restored), None once it is the
        # session's sandbox: known before the machine exists, so an end meanwhile can
        # destroy it. Never carried: a run continues as new only with its sandbox made.
        self.making: str | None = None
        self.making_on: str | None = None  # the task queue of the host making it
        running = carried.running if carried else None
        if carried:
            self.status = SessionStatus.busy if running else SessionStatus.ready
            if carried.hibernated:
                self.status = SessionStatus.hibernated
        else:
            self.status = SessionStatus.provisioning
        tasks = carried.tasks if carried else []
        self.tasks: dict[str, TaskState] = {t.id: t for t in tasks}
        self.running: TaskState | None = self.tasks[running] if running else None
        self.queue: list[str] = [t.id for t in tasks if t.id != running]
        self.paused = carried.paused if carried else False
        self.hibernated = carried.hibernated if carried else False
        # Modifications not taken yet, per task, in the order they came.
        self.instructions: dict[str, list[str]] = (
            {k: list(v) for k, v in carried.instructions.items()} if carried else {}
        )
        self.finished: dict[str, TaskStatus] = dict(carried.finished) if carried else {}
        self.submitted: dict[str, str] = dict(carried.submitted) if carried else {}
        self.cancelling = False
        # Set once the session is ending: no new work is accepted, no handler waits on.
        self.ending = False
        self.step: workflow.ActivityHandle[StepOutcome] | None = None
        # A warm pool claim under way: an end meanwhile waits for it and destroys its VM.
        self.claiming: workflow.ActivityHandle[SandboxInfo | None] | None = None
        # Set by the preserve_sandbox signal: the end keeps the sandbox's disk.
        self.preserve = carried.preserve if carried else False
        # Why the sandbox's machine died (its host said so, or a step found it gone): the
        # session replaces it before the next task.
        self.dead: str | None = carried.dead if carried else None
        # The host lost with the dead machine, if it was: the session moves off it.
        self.dead_host: str | None = carried.dead_host if carried else None
        # The task queue of the host the session moved to: its next run's (see move()).
        self.moved_to: str | None = None
        # The draining host the session is asked to move off, keeping its disk (move_off()).
        self.moving_off: str | None = None
        # Machines replaced since a step last ran: bounded by params.max_replacements.
        self.replacements = carried.replacements if carried else 0
        # The preserved sandbox to restore, for the session's first machine only: its
        # replacements are created afresh (the kept disk is gone once restored).
        self.restore_from = params.restore if carried is None else None
        # A fork's first machine is made from its checkpoint; a replacement afresh.
        self.fork_from = params.fork if carried is None else None
        self.checkpoints = list(carried.checkpoints if carried else params.checkpoints)
        self.checkpoint_hosts = dict(carried.checkpoint_hosts if carried else {})
        # Set while a checkpoint or rollback has the machine: no step starts meanwhile.
        self.holding = False
        # Set while the sandbox is being suspended or woken (see power()).
        self.powering = False
        # The checkpoints of the rollbacks under way (or waiting for the machine).
        self.rolling_to: list[str] = []
        self.events = 0
        self.keys = EventKeys(workflow.info().run_id)

    # ---- the session's life

    @workflow.run
    async def run(self, params: SessionInput) -> SessionState:
        status, error = SessionStatus.ended, None
        try:
            if params.carried is None and params.placed_host and workflow.patched("placement"):
                why = params.placed_why
                await self.record(
                    self.event(EventType.session_placed, host_id=params.placed_host, why=why)
                )
            if self.sandbox is None:
                await self.provision()
                check_cancelled()
            if self.running is not None:
                await self.run_task(self.running)  # carried over mid-task
            while await self.next_task():
                check_cancelled()
                if not self.queue:
                    continue  # its one task was cancelled while the sandbox woke
                if self.holding and workflow.patched("hold-while-queued"):
                    # A checkpoint or rollback has the machine: the task waits in the queue,
                    # where a cancel or the session's end finds it (taken off first, it was
                    # in neither the queue nor running, and an end left it queued for good).
                    await workflow.wait_condition(lambda: not self.holding)
                    continue
                await self.run_task(self.tasks[self.queue.pop(0)])
        except asyncio.CancelledError:
            pass  # the user ended the session
        except Idle:
            pass  # its task paused past the idle timeout: the session ends all the same
        except (ActivityError, ApplicationError) as exc:
            if not cancel_requested():
                status, error = SessionStatus.failed, failure_message(exc)
        # Continue-as-new (a BaseException) passes through untouched: the session goes on.
        await shielded(self.end(status, error))
        if cancel_requested():
            raise asyncio.CancelledError  # so Temporal shows the session as cancelled
        if status is SessionStatus.failed:
            raise ApplicationError(error or "the session failed", non_retryable=True)
        return self.state()

    async def next_task(self) -> bool:
        """Wait for a queued task; False once the session has been idle too long. Idle for
        ``hibernate_after_s`` first, the sandbox is suspended, and the next task wakes it."""
        idle_since, tried = workflow.now(), False
        while True:
            while not self.queue or self.dead is not None or self.moving_off is not None:
                check_cancelled()
                if self.dead is not None:
                    await self.recover()
                    continue
                if self.moving_off is not None and workflow.patched("drain-move"):
                    await self.move_off(self.moving_off)
                    continue
                self.continue_as_new_if_suggested()
                try:
                    tried = await self.idle(
                        lambda: bool(self.queue) or bool(self.dead) or self.moving_off is not None,
                        idle_since,
                        tried,
                    )
                except Idle:
                    return False
            if not self.hibernated or await self.wake():
                return True
            # It could not be woken: it is dead, replaced before the task runs.

    async def idle(self, awaited: Callable[[], bool], since: datetime, tried: bool) -> bool:
        """Wait for ``awaited``, or a moment to continue as new, while the session is idle
        (no task queued, or its task paused) since ``since``: idle ``hibernate_after_s``,
        the sandbox is suspended (once per idle spell: ``tried`` says it was, and the
        answer says it is now); idle ``idle_timeout_s``, Idle is raised."""
        after = self.params.hibernate_after_s
        hibernating = (
            after is not None
            and after < self.params.idle_timeout_s
            and not (self.hibernated or tried)
        )
        until = after if hibernating and after is not None else self.params.idle_timeout_s
        idle = (workflow.now() - since).total_seconds()
        try:
            await workflow.wait_condition(
                lambda: awaited() or self.may_continue_as_new(),
                timeout=timedelta(seconds=max(until - idle, 0.001)),
                timeout_summary="hibernate" if hibernating else "idle timeout",
            )
        except TimeoutError:
            if not hibernating:
                raise Idle from None
            await self.hibernate()
            return True
        return tried

    async def hold(self) -> None:
        """Wait out a pause of the running task, as idle: its sandbox hibernates and the session
        ends at their timeouts, and it continues as new when suggested (paused still)."""
        if not (self.paused and not self.cancelling and workflow.patched("bounded-pause")):
            # Not paused; or a run begun before pauses were bounded: it waits as it did.
            await workflow.wait_condition(lambda: not self.paused or self.cancelling)
            return
        since, tried = workflow.now(), False
        while True:
            while self.paused and not self.cancelling:
                self.continue_as_new_if_suggested()
                tried = await self.idle(lambda: not self.paused or self.cancelling, since, tried)
                # A hibernate the session's end interrupted swallowed the cancellation.
                check_cancelled()
            if not (self.hibernated and not self.cancelling):
                return
            if not await self.wake(then=SessionStatus.busy):
                # The task's files went with the machine; the next task gets a new one.
                raise ApplicationError(
                    f"the task's sandbox was lost: {self.dead}", type="SandboxDied"
                )
            # Paused again while it woke: wait that pause out too before the next step.

    async def hibernate(self) -> None:
        """Suspend the idle sandbox (a VM's memory saved to disk); one that cannot be
        suspended stays up, and says so."""
        if self.holding and workflow.patched("hold-after-power"):
            # A checkpoint or rollback has the machine: suspended under it, its save or
            # the machine it makes again would be broken.
            await workflow.wait_condition(lambda: not self.holding)
        try:
            await self.power(
                VmActivities.hibernate, "hibernate the idle sandbox", options.HIBERNATE
            )
        except ActivityError as exc:
            failed = self.event(EventType.sandbox_hibernation_failed, error=failure_message(exc))
            unsure = timed_out(exc) and workflow.patched("hibernate-unsure")
            if not unsure and workflow.patched("hibernate-checked"):
                # Failed otherwise, it may still have been suspended (a save that finished
                # before an error): what its host sees decides, not what the error says.
                assert self.sandbox is not None
                health = await self.health(self.sandbox)
                unsure = health is not None and health.suspended
            if not unsure:
                await self.record(failed)  # it stays up (a run begun before: believed so)
                return
            # Its attempts timed out, and a save may finish yet: the machine is taken for
            # hibernated, so the next task wakes it (waking one that runs does no harm).
            self.hibernated, self.status = True, SessionStatus.hibernated
            failed.data["unsure"] = True
            await self.record(
                failed, self.event(EventType.session_status, status=self.status.value)
            )
            return
        assert self.sandbox is not None
        self.hibernated, self.status = True, SessionStatus.hibernated
        await self.record(
            self.event(EventType.sandbox_hibernated, sandbox_id=self.sandbox.id),
            self.event(EventType.session_status, status=self.status.value),
        )

    async def wake(self, then: SessionStatus = SessionStatus.ready) -> bool:
        """Resume the hibernated sandbox, its files and processes as they were; the session
        is ``then`` (busy when a paused task woke it). False if it could not be woken (gone,
        or broken while it slept): it is dead, and the session replaces it."""
        if workflow.patched("waking-status"):
            self.status = SessionStatus.waking
            await self.record(self.event(EventType.session_status, status=self.status.value))
        try:
            await self.power(VmActivities.wake, "wake the sandbox", options.WAKE)
        except ActivityError as exc:
            # A run begun before failed the session; and an end is the end's.
            if cancel_requested() or not workflow.patched("wake-replaces"):
                raise
            self.dead = (
                f"it could not be woken from hibernation ({failure_message(exc)}); "
                "the files in it are lost"
            )
            return False
        assert self.sandbox is not None
        self.hibernated, self.status = False, then
        await self.record(
            self.event(EventType.sandbox_woken, sandbox_id=self.sandbox.id),
            self.event(EventType.session_status, status=self.status.value),
        )
        return True

    async def power(
        self,
        call: Callable[[VmActivities, SandboxInfo], Awaitable[None]],
        summary: str,
        timing: options.ActivityOptions,
    ) -> None:
        """Hibernate or wake the sandbox, on its host."""
        assert self.sandbox is not None
        self.powering = True
        try:
            await workflow.execute_activity_method(
                call, self.sandbox, task_queue=self.sandbox.task_queue, summary=summary, **timing
            )
        finally:
            self.powering = False

    def may_continue_as_new(self) -> bool:
        """Temporal suggests it, and this is a moment to: no handler half-way and no
        cancellation pending."""
        return (
            (workflow.info().is_continue_as_new_suggested() or self.moved_to is not None)
            and workflow.all_handlers_finished()
            and not self.cancelling
            # A new run would not know the session was asked to end.
            and not cancel_requested()
        )

    def continue_as_new_if_suggested(self) -> None:
        """Hand the session to a fresh run before its history grows too long."""
        if not self.may_continue_as_new():
            return
        assert self.sandbox is not None
        carried = self.carried(self.sandbox)
        # Bytes, as the server counts them (a character of CJK text is three).
        size, limit = len(carried.model_dump_json().encode()), self.params.max_carried_bytes
        # Only a running task's state can grow past the bound (the queue's prompts, the
        # remembered ids and keys are capped): it fails, and the session goes on without it.
        if self.running is not None and size > limit and workflow.patched("carried-size"):
            raise ApplicationError(
                f"the task's state ({size} bytes with the session's) is past the {limit} bytes "
                "a session carries to its next run; split the work into smaller tasks",
                type="CarriedStateTooLarge",
                non_retryable=True,
            )
        # The preserved disk was restored by the first run: a later one never restores it.
        workflow.continue_as_new(
            self.params.model_copy(update={"carried": carried, "restore": None}),
            # A session moved off a lost host goes on with its workflow on its new host's
            # queue: polled there, and each step dispatched eagerly again (berth/worker.py).
            task_queue=self.moved_to,
        )

    def carried(self, sandbox: SandboxInfo, *queued: TaskState) -> Carried:
        """The session as continuing as new now would carry it (with ``queued`` added)."""
        tasks = ([self.running] if self.running else []) + [self.tasks[i] for i in self.queue]
        return Carried(
            sandbox=sandbox,
            tasks=[carried_task(t) for t in [*tasks, *queued]],
            running=self.running.id if self.running else None,
            paused=self.paused,
            hibernated=self.hibernated,
            instructions=self.instructions,
            finished=self.finished,
            submitted=self.submitted,
            preserve=self.preserve,
            dead=self.dead,
            replacements=self.replacements,
            checkpoints=self.checkpoints,
            checkpoint_hosts=self.checkpoint_hosts,
            dead_host=self.dead_host,
        )

    async def provision(self) -> None:
        """The session's sandbox: the preserved one's disk on a new machine (a resumed
        session), a warm pool's VM if one is ready, else one created cold."""
        if self.fork_from is not None:
            await self.fork()
            return
        kept = self.restore_from
        if (
            kept is None
            and self.params.restore is not None
            and not workflow.patched("restore-once")
        ):
            kept = self.params.restore  # a run begun before: every machine of it restored
        if kept is not None:
            await self.restore(kept)
            return
        if self.params.warm_pool and workflow.patched("pool-claim"):
            claimed = await self.claim()
            if claimed is not None:
                # Said ready while it is relabelled: the session's first step waits for both.
                await asyncio.gather(self.assign(claimed), self.sandbox_ready(claimed, pooled=True))
                return
            check_cancelled()
        request = SandboxRequest(
            session_id=self.params.session_id,
            sandbox_id=workflow.uuid4().hex,
            template=self.params.template,
        )
        sandbox = await self.make_machine(
            SandboxActivities.provision, request, f"provision a {self.params.template!r} sandbox"
        )
        await self.sandbox_ready(sandbox)

    async def make_machine(
        self,
        call: Callable[[Any, Making], Awaitable[SandboxInfo]],
        request: Making,
        summary: str,
        task_queue: str | None = None,
    ) -> SandboxInfo:
        """Run the activity that makes the session's machine (created cold, or restored),
        on ``task_queue``'s host (the session's by default)."""
        self.sandbox, self.making = None, request.sandbox_id
        self.making_on = task_queue
        return await workflow.execute_activity_method(
            call,
            request,
            task_queue=task_queue or self.params.host_task_queue,
            summary=summary,
            **options.MAKE_MACHINE,
        )

    async def claim(self) -> SandboxInfo | None:
        """A ready VM of the template's warm pool, now the session's sandbox (relabelled by
        assign); None when the pool has none (or cannot be asked): the caller creates one
        cold."""
        session_id = self.params.session_id
        key = f"{session_id}/{workflow.uuid4().hex}" if workflow.patched("claim-per-claim") else ""
        handle = workflow.start_activity_method(
            VmActivities.claim,
            ClaimRequest(session_id=session_id, template=self.params.template, claim=key),
            task_queue=self.params.host_task_queue,
            summary=f"claim a warm {self.params.template!r} VM",
            **options.CLAIM,
        )
        # Waited on, never awaited (see run_step): an end that comes meanwhile lets the claim
        # finish and destroys what it claimed (see end()).
        self.claiming = handle
        await workflow.wait_condition(handle.done)
        self.claiming = None
        sandbox = claimed(handle)
        if sandbox is None:
            return None
        # The session's before the machine is relabelled: reconciliation asks the session
        # (state) once the label names it, and the pool until then.
        self.sandbox = sandbox
        return sandbox

    async def assign(self, sandbox: SandboxInfo) -> None:
        """Relabel a claimed VM the session's (it is the session's sandbox already)."""
        await workflow.execute_activity_method(
            VmActivities.assign,
            sandbox,
            task_queue=sandbox.task_queue,
            summary="label the claimed VM the session's",
            **options.ASSIGN,
        )

    async def restore(self, kept: SandboxInfo) -> None:
        request = RestoreRequest(
            preserved=kept, sandbox_id=workflow.uuid4().hex, session_id=self.params.session_id
        )
        # An end meanwhile destroys the new machine; the kept disk stays until the new
        # machine is up, so the session can be resumed again.
        # On the kept disk's host, which holds it (a run begun before asked its own).
        host = kept.task_queue if workflow.patched("restore-on-its-host") else None
        sandbox = await self.make_machine(
            VmActivities.restore, request, "restore the preserved sandbox", host
        )
        self.restore_from = None
        await self.sandbox_ready(
            sandbox,
            self.event(EventType.sandbox_restored, sandbox_id=sandbox.id, preserved_id=kept.id),
        )

    async def fork(self) -> None:
        """A fork's first machine: made from its parent's checkpoint."""
        assert self.fork_from is not None
        request = ForkRequest(
            checkpoint_id=self.fork_from,
            sandbox_id=workflow.uuid4().hex,
            session_id=self.params.session_id,
            template=self.params.template,
        )
        sandbox = await self.make_machine(
            CheckpointActivities.fork, request, "make the sandbox from the parent's checkpoint"
        )
        self.fork_from = None
        await self.sandbox_ready(sandbox)

    async def sandbox_ready(
        self, sandbox: SandboxInfo, *also: NewEvent, pooled: bool | None = None
    ) -> None:
        self.sandbox, self.making = sandbox, None
        self.status = SessionStatus.ready
        await self.record(
            self.event(
                EventType.sandbox_ready,
                sandbox_id=sandbox.id,
                provider=sandbox.provider,
                host_id=sandbox.host_id,
                template=sandbox.template,
                handle=sandbox.handle,
                pooled=pooled,
            ),
            *also,
            self.event(EventType.session_status, status=self.status.value),
        )

    async def recover(self) -> None:
        """Replace the dead machine: at once after a step ran on it, after a pause (a
        workflow timer, doubled each time) when it is one more death in a row, and not past
        ``max_replacements`` in a row: then the session fails, saying why. A run begun
        before replaced it at once, for ever."""
        if not workflow.patched("bounded-replacements"):
            await self.replace_sandbox()
            return
        # A session whose machines keep dying still hands its history on.
        self.continue_as_new_if_suggested()
        most = self.params.max_replacements
        if self.replacements >= most:
            raise ApplicationError(
                f"the session's machine died {self.replacements + 1} times in a row, and it "
                f"is replaced {most} times at most (BERTH_SESSION_MAX_REPLACEMENTS); the last "
                f"death: {self.dead}",
                type="ReplacementsExhausted",
                non_retryable=True,
            )
        if self.replacements:
            pause = self.params.replace_backoff_s * 2 ** (self.replacements - 1)
            await workflow.sleep(
                min(pause, MAX_REPLACE_BACKOFF_S), summary="back off before replacing again"
            )
        self.replacements += 1
        await self.replace_sandbox()

    async def replace_sandbox(self) -> None:
        """The sandbox's machine died: say so, remove what is left of it, and provision
        another for the next task (its files are gone with it)."""
        assert self.sandbox is not None
        if self.dead_host is not None and workflow.patched("host-loss"):
            await self.move(self.sandbox, self.dead_host)
            return
        dead, why = self.sandbox, self.dead
        self.status = SessionStatus.provisioning
        await self.record(
            self.event(EventType.sandbox_died, sandbox_id=dead.id, error=why),
            self.event(EventType.session_status, status=self.status.value),
        )
        if workflow.patched("replace-then-end"):
            # An end meanwhile lets the dead machine's removal finish (cancelled, it would
            # be recorded orphaned and left) and makes no new machine only to destroy it.
            await shielded(self.destroy(dead))
            self.dead, self.hibernated = None, False
            check_cancelled()
        else:
            await self.destroy(dead)
            self.dead, self.hibernated = None, False
        await self.provision()

    async def move(self, dead: SandboxInfo, lost: str) -> None:
        """The sandbox's host is lost: its machine can be neither reached nor removed (the
        host's reconciliation removes it if the host comes back), and its files are lost with
        it unless preserved. The session is placed anew, gets a machine there, and continues
        as new onto that host's queue."""
        self.status = SessionStatus.provisioning
        await self.record(
            self.event(EventType.sandbox_died, sandbox_id=dead.id, error=self.dead),
            self.event(
                EventType.host_lost,
                host_id=lost,
                sandbox_id=dead.id,
                detail=f"host {lost} is lost: the machine's files there are lost with it "
                "(unless its disk was preserved); the session goes on on a new machine "
                "on another host",
            ),
            self.event(EventType.session_status, status=self.status.value),
        )
        self.sandbox, self.dead, self.dead_host, self.hibernated = None, None, None, False
        placed = await self.place_again()
        self.params = self.params.model_copy(update={"host_task_queue": placed.task_queue})
        await self.record(
            self.event(EventType.session_placed, host_id=placed.host, why=f"moved: {placed.why}")
        )
        await self.provision()
        self.moved_to = placed.task_queue

    async def move_off(self, draining: str) -> None:
        """Its host drains with ``--move``: between tasks, the machine ends keeping its disk
        (in BERTH_KEPT_DISKS_DIR, which every host reaches), the session is placed anew,
        its disk restored on a machine there, and it continues as new onto that host's
        queue. A disk that cannot be kept leaves the session where it is."""
        self.moving_off = None
        old = self.sandbox
        if old is None or old.host_id != draining:
            return
        await self.keep(old)
        if self.sandbox is not None:
            return  # not kept (said by sandbox.preserve_failed): it stays on its host
        self.hibernated = False
        self.status = SessionStatus.provisioning
        placed = await self.place_again()
        self.params = self.params.model_copy(update={"host_task_queue": placed.task_queue})
        await self.record(
            self.event(
                EventType.session_placed,
                host_id=placed.host,
                why=f"moved off draining host {draining}: {placed.why}",
            ),
            self.event(EventType.session_status, status=self.status.value),
        )
        # Restored on the new host (the kept disk is in a folder every host reaches).
        await self.restore(old.model_copy(update={"task_queue": placed.task_queue}))
        self.moved_to = placed.task_queue

    async def place_again(self) -> Placement:
        """A host for the session from the registry as it reads now (through an activity,
        so a replay takes the same rows, and the same random pick from workflow.random())."""
        for _ in range(PLACE_AGAIN_TRIES):
            fleet = await workflow.execute_activity_method(
                FleetActivities.read,
                self.params.template,
                task_queue=FLEET_TASK_QUEUE,
                summary="read the host registry to place the session anew",
                **options.READ_FLEET,
            )
            placed = place(fleet.hosts, self.params.template, fleet.memory_mb, workflow.random())
            if placed.host is not None:
                return placed
            await workflow.sleep(PLACE_AGAIN_EVERY, summary="no host has room: wait")
        raise ApplicationError(
            f"the session's host was lost and no other host had room: {placed.why}",
            type="NoHostWithRoom",
            non_retryable=True,
        )

    async def end(self, status: SessionStatus, error: str | None) -> None:
        """The real end, however it came: every task and step gets its final status, the
        running command is killed, the sandbox destroyed, and the session's status said."""
        self.ending = True
        drafts: list[NewEvent] = []
        step = self.step
        if step is not None and not step.done():
            step.cancel()  # done once the guest has killed it (WAIT_CANCELLATION_COMPLETED)
            # Past the timeout the host is gone; its reconciliation deals with the machine.
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(step.done, timeout=STOP_STEP_TIMEOUT)
            if step.done() and not step.cancelled():
                step.exception()  # taken: how the step ended is recorded below
        task = self.running
        if task is not None and task.status not in FINISHED:
            if task.current is not None:
                drafts.append(self.step_end(task, task.current, "cancelled", "session ended"))
            drafts += self.finish(task, TaskStatus.cancelled, error="session ended")
        for task_id in self.queue:
            drafts += self.finish(self.tasks[task_id], TaskStatus.cancelled, error="session ended")
        self.queue.clear()
        if drafts:
            await self.record(*drafts)
        if self.claiming is not None:
            # The pool may hand a VM to this session yet: it is the session's to destroy.
            claiming = self.claiming
            await workflow.wait_condition(claiming.done)
            self.sandbox = claimed(claiming) or self.sandbox
        if self.holding and workflow.patched("end-after-hold"):
            # A checkpoint or rollback has the machine: its activity ends (bounded by its
            # timeouts), so a checkpoint it saved is deleted below and a machine a rollback
            # made again is the one destroyed, not left running with nothing to remove it.
            await workflow.wait_condition(lambda: not self.holding)
        if self.sandbox is not None and self.preserve:
            await self.keep(self.sandbox)
        if self.checkpoints and not self.preserve:
            await self.drop_checkpoints()
        doomed = self.machine()
        if doomed is not None:
            await self.destroy(doomed)
        # A submit accepted just before the end finishes its task itself (see submit_task).
        await workflow.wait_condition(workflow.all_handlers_finished)
        self.status = status
        await self.record(self.event(EventType.session_status, status=status.value, error=error))

    async def keep(self, sandbox: SandboxInfo) -> None:
        """End the machine keeping its disk, for a resume; if that fails, it is destroyed."""
        try:
            await workflow.execute_activity_method(
                VmActivities.preserve,
                sandbox,
                task_queue=sandbox.task_queue,
                summary="preserve the sandbox's disk",
                **options.PRESERVE,
            )
        except ActivityError as exc:
            await self.record(
                self.event(
                    EventType.sandbox_preserve_failed,
                    sandbox_id=sandbox.id,
                    error=failure_message(exc),
                )
            )
            return
        await self.record(self.event(EventType.sandbox_preserved, sandbox_id=sandbox.id))
        self.sandbox = None

    async def destroy(self, sandbox: SandboxInfo) -> None:
        try:
            await workflow.execute_activity_method(
                SandboxActivities.destroy,
                sandbox,
                task_queue=sandbox.task_queue,
                summary="destroy the sandbox",
                **options.DESTROY,
            )
            await self.record(self.event(EventType.sandbox_destroyed, sandbox_id=sandbox.id))
        except ActivityError as exc:
            # The session still ends; the host's reconciliation removes the machine later.
            await self.record(
                self.event(
                    EventType.sandbox_orphaned, sandbox_id=sandbox.id, error=failure_message(exc)
                )
            )
        self.sandbox, self.making = None, None

    # ---- one task

    async def run_task(self, task: TaskState) -> None:
        # Its activities' spans join the trace of the request that submitted it (traces on;
        # no command changes, so histories replay alike).
        with tracing.under(task.trace):
            await self.run_task_traced(task)

    async def run_task_traced(self, task: TaskState) -> None:
        if self.holding:  # a run begun before hold-while-queued: the task waits here
            await workflow.wait_condition(lambda: not self.holding)
        self.running, self.cancelling = task, False
        try:
            if task.status is TaskStatus.queued:  # not a task carried over mid-way
                self.paused = False
                if self.params.auto_checkpoint == "before_task":
                    await self.auto_checkpoint(task)
                await self.plan(task)
            while not self.cancelling:
                # A modification is taken between steps, and before the result is verified.
                instruction = self.take_instruction(task.id)
                if instruction is not None:
                    await self.revise(task, instruction=instruction)
                elif task.position < len(task.steps):
                    await self.next_step(task)
                elif not task.agent or await self.verify(task):
                    break
            if self.cancelling:
                await self.record(*self.finish(task, TaskStatus.cancelled))
            else:
                result = task.result
                if not task.agent:
                    result = task.recent[-1].outcome.output_tail if task.recent else ""
                await self.record(*self.finish(task, TaskStatus.succeeded, result=result))
        except (ActivityError, ApplicationError) as exc:
            if cancel_requested():
                raise asyncio.CancelledError from exc  # the session's end, not the task's
            await self.record(*self.finish(task, TaskStatus.failed, error=failure_message(exc)))
        self.running, self.cancelling = None, False

    async def next_step(self, task: TaskState) -> None:
        """Run the task's next step, between steps taking a pause, a modification or a
        continue-as-new; a step that fails sends the agent back to planning."""
        check_cancelled()
        await self.hold()
        if self.cancelling or task.id in self.instructions:
            return  # a modification that came during the pause goes first
        if task.agent and task.executed >= self.params.max_steps:
            raise ApplicationError(
                f"the task ran out of its step budget: {task.executed} steps ran "
                "without reaching the goal",
                type="StepBudgetExhausted",
            )
        self.continue_as_new_if_suggested()
        outcome = await self.run_step(task)
        if outcome is None:
            return  # cancelled while it ran
        self.replacements = 0  # the machine works: a later death starts a new count
        step = task.steps[task.position]
        done = DoneStep(step=step, outcome=outcome).brief()
        task.recent = [*task.recent, done][-RECENT_STEPS:]
        task.executed += 1
        task.position += 1
        if not outcome.ok and not self.cancelling:
            failure = f"step {task.position} ({step.describe()}) {outcome.problem()}"
            if not task.agent:
                raise ApplicationError(failure)
            await self.revise(task, feedback=failure)

    @staticmethod
    def services(text: str) -> bool:
        """Whether a written plan's service lines start services: asked only of a plan that
        has one, so other tasks' histories stay as they were."""
        return has_service_lines(text) and workflow.patched("service-steps")

    async def plan(self, task: TaskState) -> None:
        self.status = SessionStatus.busy
        opening = [self.event(EventType.session_status, status=self.status.value)]
        steps = user_plan(task.prompt, services=self.services(task.prompt))
        # Asked only of a step plan, so other tasks' histories stay as they were.
        if is_step_plan(task.prompt) and workflow.patched("step-plans"):
            steps = step_plan(task.prompt)  # checked by the API already
        plan = None if steps is None else Plan(steps=steps)
        if plan is None:
            # Sessions begun before the agent loop replay as they ran: planned once, unchecked.
            task.agent = workflow.patched("agent-loop")
            await self.record(*opening, self.set_task(task, TaskStatus.planning))
            opening = []
            plan = await self.ask_planner(task)
            if plan is None:
                return  # cancelled while the model planned
        task.steps = list(plan.steps)
        # A pause that came while the model planned holds from the first step on.
        running = self.set_task(task, TaskStatus.paused if self.paused else TaskStatus.running)
        await self.record(*opening, running, self.plan_event(task, 0, plan))

    async def revise(
        self, task: TaskState, *, instruction: str | None = None, feedback: str | None = None
    ) -> None:
        """Replace the steps not run yet: with a written plan, or the model's new plan."""
        steps = user_plan(instruction, self.services(instruction)) if instruction else None
        plan = None if steps is None else Plan(steps=steps)
        if plan is None:
            if instruction:
                task.notes.append(instruction)
            if feedback and task.agent:
                # The user's modifications are theirs to make; only failures count.
                if task.revisions >= self.params.max_revisions:
                    raise ApplicationError(
                        f"the task did not reach its goal in {task.revisions} revised plans; "
                        f"the last problem: {feedback}",
                        type="RevisionBudgetExhausted",
                    )
                task.revisions += 1
            plan = await self.ask_planner(task, instruction, feedback)
            if plan is None:
                return  # cancelled while the model planned
        task.steps = task.steps[: task.position] + list(plan.steps)
        reason = f"modified: {instruction}" if instruction else feedback
        await self.record(self.plan_event(task, task.position, plan, reason))

    async def ask_planner(
        self, task: TaskState, instruction: str | None = None, feedback: str | None = None
    ) -> Plan | None:
        return await self.consult(
            PlanningActivities.plan,
            PlanRequest(
                task_id=task.id,
                session_id=self.params.session_id,
                prompt=task.prompt,
                instruction=instruction,
                notes=task.notes,
                done=task.recent,
                feedback=feedback,
                model=self.params.model,
            ),
            "revise the plan" if instruction or feedback else "plan the task",
        )

    async def consult(
        self,
        call: Callable[[Any, Request], Awaitable[Answer]],
        request: Request,
        summary: str,
    ) -> Answer | None:
        """A model call (planning, verification); None if the task is cancelled meanwhile,
        which does not wait for the model."""
        handle = workflow.start_activity_method(
            call,
            request,
            summary=summary,
            **options.CONSULT,
        )
        # Waited on, never awaited (see run_step): the session's own end is end()'s.
        await workflow.wait_condition(lambda: handle.done() or self.cancelling)
        if not handle.done():
            handle.cancel()
            await workflow.wait_condition(handle.done)
        if self.cancelling:
            with contextlib.suppress(ActivityError, asyncio.CancelledError):
                handle.result()  # taken: the task is cancelled, whatever the model said
            return None
        return handle.result()

    async def verify(self, task: TaskState) -> bool:
        """Have the model check what the steps did against the goal and give the answer;
        a result that falls short is planned again. True once the task is over."""
        verdict = await self.consult(
            PlanningActivities.verify,
            VerifyRequest(
                task_id=task.id,
                session_id=self.params.session_id,
                prompt=task.prompt,
                notes=task.notes,
                done=task.recent,
                model=self.params.model,
            ),
            "verify the result",
        )
        if verdict is None:
            return True  # cancelled
        await self.record(
            self.event(
                EventType.task_verified,
                task_id=task.id,
                ok=verdict.ok,
                reason=verdict.reason,
                answer=verdict.answer,
                **answered_by(verdict),
            )
        )
        if verdict.ok:
            task.result = verdict.answer
            return True
        shortfall = f"the result falls short of the goal: {verdict.reason}"
        await self.revise(task, feedback=shortfall)
        if task.position == len(task.steps) and not self.cancelling:
            # Nothing new to run: verifying the same work again would say the same.
            raise ApplicationError(
                f"{shortfall}; the agent has no further steps to try", type="GoalNotReached"
            )
        return False

    async def run_step(self, task: TaskState) -> StepOutcome | None:
        """Run the task's next step in the sandbox; None if the task was cancelled meanwhile.
        The activity records the step's start, output and end itself: no extra history."""
        if self.holding:  # a checkpoint or rollback has the machine: the step waits
            await workflow.wait_condition(lambda: not self.holding or self.cancelling)
            if self.cancelling:
                return None
        assert self.sandbox is not None
        index = task.position
        step = task.steps[index]
        task.current = index
        request = StepRequest(
            sandbox=self.sandbox,
            task_id=task.id,
            index=index,
            step=step,
            timeout_s=self.params.step_timeout_s,
        )
        handle = workflow.start_activity_method(
            SandboxActivities.run_step,
            request,
            task_queue=self.sandbox.task_queue,
            summary=f"step {index + 1}/{len(task.steps)}: {step.describe()[:80]}",
            **options.running_step(self.params.step_timeout_s),
        )
        self.step = handle
        # The handle is waited on, never awaited: awaiting it would hand the session's own
        # cancellation to the activity, and end() must be the one to stop the step.
        await workflow.wait_condition(lambda: handle.done() or self.cancelling)
        if not handle.done():
            handle.cancel()
            await workflow.wait_condition(handle.done)
        self.step, task.current = None, None
        try:
            return handle.result()
        except (ActivityError, asyncio.CancelledError) as exc:
            refusal = refused(exc)
            if refusal is not None:
                # Judged before it reached the guest: nothing ran, and the agent is told why.
                await self.record(self.step_end(task, index, "refused", refusal))
                return StepOutcome(exit_code=REFUSED_EXIT, error=f"refused: {refusal}")
            if died(exc) and self.dead is None:
                self.dead = failure_message(exc)
            elif unavailable(exc) and self.dead is None and workflow.patched("unavailable-check"):
                self.dead = await self.checked_dead(request.sandbox, failure_message(exc))
            # Retries run out, or a cancel between attempts: an attempt may have left the
            # command running, and the next step must not run beside it.
            await self.stop_step(request)
            if not self.cancelling:
                await self.record(self.step_end(task, index, "failed", failure_message(exc)))
                raise
            await self.record(self.step_end(task, index, "cancelled", "cancelled"))
            return None

    async def health(self, sandbox: SandboxInfo) -> Health | None:
        """The sandbox's machine as its host sees it now; None if the host cannot say (its
        worker down: its watch tells)."""
        try:
            health: Health = await workflow.execute_activity_method(
                SandboxActivities.check,
                sandbox,
                task_queue=sandbox.task_queue,
                summary="check the sandbox's machine",
                **options.CHECK_SANDBOX,
            )
        except ActivityError:
            return None
        return health

    async def checked_dead(self, sandbox: SandboxInfo, failure: str) -> str | None:
        """Why the sandbox counts as dead after a step ran out of attempts without its
        guest, asked of its host (its machine not running, or its guest not connected);
        None if it is healthy, or the host cannot say."""
        health = await self.health(sandbox)
        if health is None or health.ok:
            return None
        if health.suspended and workflow.patched("suspended-wakes"):
            # Paused by an operator or the host, or hibernated by a save that outlived its
            # attempts: its files are whole, so the next task wakes it, not a new machine.
            self.hibernated = True
            return None
        state = "its guest agent is not connected" if health.running else "its machine is down"
        return f"a step found no guest ({failure}), and {state} ({health.detail})"

    async def stop_step(self, request: StepRequest) -> None:
        with contextlib.suppress(ActivityError):  # the guest is gone: nothing runs there
            await workflow.execute_activity_method(
                SandboxActivities.stop_step,
                request,
                task_queue=request.sandbox.task_queue,
                summary=f"stop step {request.index + 1}",
                **options.STOP_STEP,
            )

    # ---- updates and queries

    @workflow.update(name="submit_task")
    @answering
    async def submit_task(self, submission: TaskSubmission) -> TaskRef:
        known = self.submission(submission)
        if known is not None:
            return known
        task = TaskState(id=str(workflow.uuid4()), prompt=submission.prompt, trace=submission.trace)
        self.tasks[task.id] = task
        if submission.key:
            self.submitted[submission.key] = task.id
            while len(self.submitted) > REMEMBERED_KEYS:
                del self.submitted[next(iter(self.submitted))]
        # Queued only once recorded: the task's row must exist before its first step's.
        await self.record(self.event(EventType.task_queued, task_id=task.id, prompt=task.prompt))
        if self.ending:  # the session began to end while this was being recorded
            await self.record(*self.finish(task, TaskStatus.cancelled, error="session ended"))
        else:
            self.queue.append(task.id)
        return TaskRef(id=task.id, status=task.status)

    @submit_task.validator
    def check_submit(self, submission: TaskSubmission) -> None:
        # A submission sent again is answered with its task before anything else is
        # checked: it asks for nothing new (the queue may be full, the session ending).
        if self.submission(submission) is not None:
            return
        self.check_open()
        if len(self.tasks) - (self.running is not None) >= MAX_QUEUED_TASKS:
            raise ValueError(f"{MAX_QUEUED_TASKS} tasks are queued already; wait for some to end")
        # Queued tasks are carried to the next run with the rest: one that would take the
        # session past its bound is refused now, not failed (or wedged) at continue-as-new.
        task = TaskState(id="0" * 36, prompt=submission.prompt)  # an id's length
        self.check_carried(0, "wait for queued tasks to end, or send a shorter task", task)

    def check_carried(self, more: int, instead: str, *queued: TaskState) -> None:
        """A ValueError (saying to do ``instead``) if the session, with ``queued`` added and
        ``more`` bytes besides, would carry past its bound to its next run."""
        carried = self.carried(self.machine() or self.unmade(""), *queued)
        size = len(carried.model_dump_json().encode()) + more
        limit = self.params.max_carried_bytes
        if size > limit:
            raise ValueError(
                f"with this the session would carry {size} bytes to its next run, past its "
                f"{limit}; {instead}"
            )

    def submission(self, submission: TaskSubmission) -> TaskRef | None:
        """The task a submission's key queued already, or None for a new submission; a
        ValueError for a key whose task the session no longer remembers (only a run begun
        before keys were forgotten with their tasks kept such a key)."""
        known = self.submitted.get(submission.key) if submission.key else None
        if known is None:
            return None
        task = self.tasks.get(known)
        status = task.status if task is not None else self.finished.get(known)
        if status is None:
            raise ValueError(
                f"task {known}, queued with this Idempotency-Key, has finished; the session "
                "no longer remembers how: the task itself says"
            )
        return TaskRef(id=known, status=status)

    @workflow.update(name="pause_task")
    @answering
    async def pause_task(self, control: TaskControl) -> TaskRef:
        self.paused = True
        task = self.tasks[control.task_id]
        await self.record(self.set_task(task, TaskStatus.paused))
        return TaskRef(id=task.id, status=task.status)

    @pause_task.validator
    def check_pause(self, control: TaskControl) -> None:
        self.running_task(control.task_id, TaskStatus.planning, TaskStatus.running)

    @workflow.update(name="resume_task")
    @answering
    async def resume_task(self, control: TaskControl) -> TaskRef:
        self.paused = False
        task = self.tasks[control.task_id]
        await self.record(self.set_task(task, TaskStatus.running))
        return TaskRef(id=task.id, status=task.status)

    @resume_task.validator
    def check_resume(self, control: TaskControl) -> None:
        self.running_task(control.task_id, TaskStatus.paused)

    @workflow.update(name="cancel_task")
    @answering
    async def cancel_task(self, control: TaskControl) -> TaskRef:
        task = self.tasks[control.task_id]
        if task.id in self.queue:
            self.queue.remove(task.id)
            await self.record(*self.finish(task, TaskStatus.cancelled))
            return TaskRef(id=task.id, status=task.status)
        self.cancelling = True
        # Ending the session finishes every task too, so this never waits forever.
        await workflow.wait_condition(lambda: task.status in FINISHED)
        return TaskRef(id=task.id, status=task.status)

    @cancel_task.validator
    def check_cancel(self, control: TaskControl) -> None:
        self.check_open()
        task = self.known_task(control.task_id)
        if task.status in FINISHED:
            raise ValueError(f"task {task.id} has {task.status.value} already")
        if task is not self.running and task.id not in self.queue:
            raise ValueError(f"task {task.id} is being queued; try again in a moment")

    @workflow.update(name="modify_task")
    @answering
    async def modify_task(self, change: TaskModification) -> TaskRef:
        task = self.tasks[change.task_id]
        pending = self.instructions.setdefault(task.id, [])
        if workflow.patched("every-modification"):
            pending.append(change.instruction)
        else:
            pending[:] = [change.instruction]  # a run begun before kept the last one only
        await self.record(
            self.event(EventType.task_modified, task_id=task.id, instruction=change.instruction)
        )
        return TaskRef(id=task.id, status=task.status)

    @modify_task.validator
    def check_modify(self, change: TaskModification) -> None:
        self.check_cancel(TaskControl(task_id=change.task_id))
        # Every modification is carried with its task and given to each later planning
        # call: a task takes a bounded number of them.
        task = self.tasks[change.task_id]
        given = task.notes + self.instructions.get(task.id, [])
        if len(given) >= MAX_NOTES:
            raise ValueError(
                f"task {task.id} has {len(given)} modifications already, the most a task "
                "takes; cancel it and submit a new task instead"
            )
        chars = sum(map(len, given)) + len(change.instruction)
        if chars > MAX_NOTES_CHARS:
            raise ValueError(
                f"task {task.id}'s modifications would come to {chars} characters, past the "
                f"{MAX_NOTES_CHARS} a task takes; cancel it and submit a new task instead"
            )
        # The note is carried with its task: many queued tasks' notes add up past the bound.
        note = len(json.dumps(change.instruction, ensure_ascii=False).encode()) + 1  # and comma
        self.check_carried(note, "wait for queued tasks to end, or send a shorter note")

    # ---- checkpoints, rollback (helpers in workflows/checkpoints.py)

    @workflow.update(name="checkpoint")
    @answering
    async def checkpoint(self, ask: CheckpointAsk) -> CheckpointRef:
        await self.take_machine()
        try:
            return await self.save_checkpoint(ask.memory, ask.label)
        finally:
            self.holding = False

    @checkpoint.validator
    def check_checkpoint(self, ask: CheckpointAsk) -> None:
        self.check_open()
        checkpoints.check_room(self.checkpoints)

    @workflow.update(name="rollback")
    @answering
    async def rollback(self, ask: RollbackAsk) -> RollbackRef:
        self.rolling_to.append(ask.checkpoint_id)
        try:
            await self.take_machine(stop=True)
            try:
                assert self.sandbox is not None
                self.sandbox = await workflow.execute_activity_method(
                    CheckpointActivities.roll_back,
                    CheckpointRequest(sandbox=self.sandbox, checkpoint_id=ask.checkpoint_id),
                    task_queue=self.sandbox.task_queue,
                    summary="roll the sandbox back to a checkpoint",
                    **checkpoints.SAVE,
                )
                undone = checkpoints.undone(self.finished, ask.tasks_before)
                await self.record(
                    self.event(
                        EventType.session_rolled_back,
                        checkpoint_id=ask.checkpoint_id,
                        tasks=undone,
                    )
                )
                return RollbackRef(checkpoint_id=ask.checkpoint_id, rolled_back=undone)
            finally:
                self.holding = False
        finally:
            self.rolling_to.remove(ask.checkpoint_id)

    @rollback.validator
    def check_rollback(self, ask: RollbackAsk) -> None:
        self.check_open()
        checkpoints.check_known(self.checkpoints, ask.checkpoint_id)

    @workflow.update(name="delete_checkpoint")
    @answering
    async def delete_checkpoint(self, ask: CheckpointControl) -> None:
        self.checkpoints.remove(ask.checkpoint_id)
        gone = ask.checkpoint_id
        if gone in self.rolling_to and workflow.patched("delete-after-rollback"):
            # Deleted under a rollback to it, the machine would be removed and never made
            # again from the checkpoint's disk: deleted once the rollback is done.
            await workflow.wait_condition(lambda: gone not in self.rolling_to)
        await self.forget_checkpoint(gone)

    @delete_checkpoint.validator
    def check_delete_checkpoint(self, ask: CheckpointControl) -> None:
        self.check_open()
        checkpoints.check_known(self.checkpoints, ask.checkpoint_id)

    async def take_machine(self, stop: bool = False) -> None:
        """Have the machine for a checkpoint or rollback: after any other has done with it,
        up and awake, and between steps: the running step ends by itself (a bounded wait),
        or with ``stop`` the running task is stopped (a rollback undoes it anyway)."""
        workflow.patched("checkpoints")
        await workflow.wait_condition(lambda: not self.holding)
        # Every waiter is woken at once when the machine is let go: the first to run took
        # it, and the others wait again (a run begun before let them all take it).
        while self.holding and workflow.patched("hold-one-at-a-time"):
            await workflow.wait_condition(lambda: not self.holding)
        self.holding = True
        try:
            self.check_not_ending()
            if self.powering and workflow.patched("hold-after-power"):
                # Being suspended or woken (the idle session's): that ends first, then the
                # machine is woken below if it was suspended.
                await workflow.wait_condition(lambda: not self.powering)
            if stop and self.running is not None:
                self.cancelling = True
            await workflow.wait_condition(
                lambda: (
                    self.step is None
                    and self.sandbox is not None
                    and self.dead is None
                    and (not stop or self.running is None)
                ),
                timeout=checkpoints.STEP_WAIT,
            )
            check_cancelled()
            self.check_not_ending()
            if self.hibernated:
                then = SessionStatus.busy if self.running else SessionStatus.ready
                if not await self.wake(then=then):
                    raise ApplicationError(f"the sandbox was lost: {self.dead}")
        except TimeoutError:
            self.holding = False
            raise ApplicationError(
                "the sandbox is busy (a step still running, or the machine being made); "
                "try again in a moment",
                non_retryable=True,
            ) from None
        except BaseException:
            self.holding = False
            raise

    def check_not_ending(self) -> None:
        """A checkpoint or rollback whose turn came as the session began to end stops: the
        end waits for it (see end), and then has the machine."""
        if self.ending and workflow.patched("end-after-hold"):
            raise ApplicationError("the session is ending", non_retryable=True)

    async def save_checkpoint(self, memory: bool, label: str | None) -> CheckpointRef:
        assert self.sandbox is not None
        checkpoint_id = workflow.uuid4().hex
        saved = await workflow.execute_activity_method(
            CheckpointActivities.take,
            CheckpointRequest(sandbox=self.sandbox, checkpoint_id=checkpoint_id, memory=memory),
            task_queue=self.sandbox.task_queue,
            summary=f"checkpoint the sandbox{': ' + label if label else ''}"[:100],
            **checkpoints.SAVE,
        )
        self.checkpoints.append(checkpoint_id)
        if workflow.patched("checkpoint-hosts"):
            self.checkpoint_hosts[checkpoint_id] = self.sandbox.task_queue
        state = checkpoints.session_state(self.tasks, self.running, self.finished)
        await self.record(
            self.event(
                EventType.checkpoint_created,
                checkpoint_id=checkpoint_id,
                label=label,
                memory=saved.memory,
                size_bytes=saved.size_bytes,
                sandbox=self.sandbox.model_dump(mode="json"),
                state=state,
            )
        )
        return CheckpointRef(id=checkpoint_id, memory=saved.memory, size_bytes=saved.size_bytes)

    async def auto_checkpoint(self, task: TaskState) -> None:
        """The session's checkpoint before each task; one that fails is said, not fatal."""
        if len(self.checkpoints) >= MAX_CHECKPOINTS:
            return
        try:
            await self.take_machine()
            try:
                await self.save_checkpoint(False, f"before: {task.prompt[:80]}")
            finally:
                self.holding = False
        except (ActivityError, ApplicationError) as exc:
            workflow.logger.warning("the automatic checkpoint failed: %s", failure_message(exc))

    async def forget_checkpoint(self, checkpoint_id: str) -> None:
        # On the host that keeps it, which the session may have moved away from.
        host = self.checkpoint_hosts.pop(checkpoint_id, None) or self.params.host_task_queue
        with contextlib.suppress(ActivityError):  # left behind: the host's disk only
            await workflow.execute_activity_method(
                CheckpointActivities.delete,
                checkpoint_id,
                task_queue=host,
                summary="delete a checkpoint",
                **checkpoints.DELETE,
            )
        await self.record(self.event(EventType.checkpoint_deleted, checkpoint_id=checkpoint_id))

    async def drop_checkpoints(self) -> None:
        """The session ends without keeping its disk: its checkpoints go too."""
        while self.checkpoints:
            await self.forget_checkpoint(self.checkpoints.pop())

    @workflow.signal(name="preserve_sandbox")
    def preserve_sandbox(self) -> None:
        """The session's coming end keeps its sandbox's disk (sent just before the end)."""
        self.preserve = True

    @workflow.signal(name="sandbox_died")
    def sandbox_died(self, death: SandboxDeath) -> None:
        """The sandbox's host saw its machine die."""
        current = self.machine()
        if current is None or current.id != death.sandbox_id:
            return
        if not self.dead:
            self.dead = death.detail
        # Its host lost, the machine is not removed but left, even if a step found it dead.
        self.dead_host = death.host_lost or self.dead_host

    @workflow.signal(name="move_off")
    def move_off_host(self, host_id: str) -> None:
        """Its host is being drained with ``--move``: the session moves off it, keeping its
        disk, once it is between tasks."""
        if self.sandbox is not None and self.sandbox.host_id == host_id and not self.ending:
            self.moving_off = host_id

    @workflow.query(name="state")
    def state(self) -> SessionState:
        return SessionState(
            session_id=self.params.session_id,
            status=self.status,
            sandbox=self.machine(),
            tasks=list(self.tasks.values()),
            finished=self.finished,
        )

    def machine(self) -> SandboxInfo | None:
        """The session's machine as the destroy activity and the state query take it: its
        sandbox, or the machine being made, of which only the id and where it is made are
        known yet (empty provider, host and handle: its provider names it from the id)."""
        if self.sandbox is not None or self.making is None:
            return self.sandbox
        return self.unmade(self.making)

    def unmade(self, sandbox_id: str) -> SandboxInfo:
        """A machine not made yet: only its id and where it is made are known."""
        return SandboxInfo(
            id=sandbox_id,
            session_id=self.params.session_id,
            provider="",
            host_id="",
            task_queue=self.making_on or self.params.host_task_queue,
            template=self.params.template,
            handle="",
        )

    def check_open(self) -> None:
        if self.ending or self.status in (SessionStatus.ended, SessionStatus.failed):
            raise ValueError("the session is ending" if self.ending else "the session has ended")

    def known_task(self, task_id: str) -> TaskState:
        task = self.tasks.get(task_id)
        if task is not None:
            return task
        if task_id in self.finished:
            raise ValueError(f"task {task_id} has {self.finished[task_id].value} already")
        raise ValueError(f"no task {task_id} in this session")

    def take_instruction(self, task_id: str) -> str | None:
        """The task's earliest modification not taken yet, or None."""
        pending = self.instructions.get(task_id)
        if not pending:
            return None
        instruction = pending.pop(0)
        if not pending:
            del self.instructions[task_id]
        return instruction

    def running_task(self, task_id: str, *allowed: TaskStatus) -> None:
        self.check_open()
        task = self.known_task(task_id)
        if task is not self.running or task.status not in allowed:
            raise ValueError(f"task {task_id} is {task.status.value}, not {allowed[0].value}")

    # ---- progress: events for the session's log

    def event(self, type: EventType, **data: Any) -> NewEvent:
        # The key makes a retried RecordProgress a no-op (see workflows/keys.py). A run begun
        # before keyed its events by their count, which a retried workflow task could give
        # to another event than its lost attempt's.
        self.events += 1
        if type == EventType.session_status:
            self.show_status(data["status"])
        data = {k: v for k, v in data.items() if v is not None}
        if workflow.patched("content-keys"):
            key = self.keys.key(type, data)
        else:
            key = f"{workflow.info().run_id}/{self.events}"
        return NewEvent(type=type, data=data, key=key)

    def show_status(self, status: str) -> None:
        """The session's status as its search attribute, for the Temporal UI's filters (when
        the namespace has the attributes: the API says so in the input)."""
        if self.params.search_attributes and workflow.patched("search-attributes"):
            workflow.upsert_search_attributes([search.STATUS.value_set(status)])

    def set_task(self, task: TaskState, status: TaskStatus, **extra: str | None) -> NewEvent:
        task.status = status
        task.result = extra.get("result", task.result)
        task.error = extra.get("error", task.error)
        return self.event(EventType.task_status, task_id=task.id, status=status.value, **extra)

    def finish(self, task: TaskState, status: TaskStatus, **extra: str | None) -> list[NewEvent]:
        """A task's final status; finished tasks leave the carried state."""
        drafts = [self.set_task(task, status, **extra)]
        self.tasks.pop(task.id, None)
        self.instructions.pop(task.id, None)
        self.finished[task.id] = status
        while len(self.finished) > REMEMBERED_TASKS:
            forgotten = next(iter(self.finished))
            del self.finished[forgotten]
            # Its key goes with it: a key kept would name a task the session cannot answer.
            for key in [k for k, v in self.submitted.items() if v == forgotten]:
                del self.submitted[key]
        if self.running is task and not self.ending:
            # A task cancelled while paused may leave its sandbox hibernated.
            self.status = SessionStatus.hibernated if self.hibernated else SessionStatus.ready
            drafts.append(self.event(EventType.session_status, status=self.status.value))
        return drafts

    def plan_event(
        self, task: TaskState, first: int, plan: Plan, revised: str | None = None
    ) -> NewEvent:
        steps = [s.model_dump() for s in task.steps[first:]]
        return self.event(
            EventType.task_plan, task_id=task.id, first=first, steps=steps, revised=revised,
            **answered_by(plan),
        )  # fmt: skip

    def step_end(self, task: TaskState, index: int, status: str, why: str) -> NewEvent:
        # The activity's own key: whichever of the two records the end first wins.
        return NewEvent(
            type=EventType.step_finished,
            data={"task_id": task.id, "index": index, "step": task.steps[index].model_dump(),
                  "status": status, "exit_code": None, "error": why},
            key=step_key(task.id, index, "finished"),
        )  # fmt: skip

    async def record(self, *drafts: NewEvent) -> None:
        batch = ProgressBatch(session_id=self.params.session_id, events=list(drafts))
        # The database down: tried a few times within this workflow task, then again after
        # a durable wait, which ends the task (its history would grow with every heartbeat
        # of a task that never ends) and lets the session answer queries, updates and
        # signals meanwhile. The events' keys make a retry after a lost answer a no-op.
        # A run begun before retries without end inside one workflow task.
        later = workflow.patched("record-later")
        tries = options.RECORD_TRIES if later else options.RECORD_RETRY_UNBOUNDED
        wait = options.RECORD_AGAIN_AFTER
        while True:
            try:
                await workflow.execute_local_activity_method(
                    ProgressActivities.record,
                    batch,
                    start_to_close_timeout=options.RECORD_TIMEOUT,
                    retry_policy=tries,
                    summary=", ".join(d.type for d in drafts),
                )
                return
            # A local activity's failure comes as its own error (an ApplicationError), not
            # wrapped in an ActivityError as a remote activity's.
            except (ActivityError, ApplicationError) as exc:
                if not later:
                    raise
                workflow.logger.warning(
                    "recording progress failed: %s; again in %s", failure_message(exc), wait
                )
            await workflow.sleep(wait, summary="record progress again")
            wait = min(wait * 2, options.RECORD_AGAIN_MAX)


def carried_task(task: TaskState) -> TaskState:
    """A task as carried to the next run: its executed steps brief (a file's content cut
    short), since nothing runs or plans from them again; the next planning call takes its
    ``recent`` steps and notes."""
    executed = [brief_step(s) for s in task.steps[: task.position]]
    return task.model_copy(update={"steps": executed + task.steps[task.position :]})


def claimed(handle: workflow.ActivityHandle[SandboxInfo | None]) -> SandboxInfo | None:
    """What a finished claim handed out; a claim that failed got nothing (create cold)."""
    try:
        return handle.result()
    except (ActivityError, asyncio.CancelledError) as exc:
        workflow.logger.warning("claiming a warm VM failed: %s", failure_message(exc))
        return None


def cancel_requested() -> bool:
    """Whether the session itself was cancelled. A cancellation that comes while the
    workflow awaits an activity is handed to that activity, and if the activity completes
    all the same, the awaiting code never sees a CancelledError: the request is still on
    record here."""
    return workflow.cancellation_reason() is not None


def check_cancelled() -> None:
    """Raise the session's cancellation if an awaited activity swallowed it."""
    if cancel_requested():
        raise asyncio.CancelledError


async def shielded(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to its end even if the workflow is cancelled again meanwhile."""
    task = asyncio.ensure_future(work)
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            continue
    task.result()
