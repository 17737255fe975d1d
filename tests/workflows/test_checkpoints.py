"""The session workflow's checkpoints, rollbacks and forks (issue 19) on the Temporal dev
server with stub activities (the edge): a checkpoint taken between tasks and one waiting for
the running step, a rollback that stops the running task and names the tasks it undoes,
checkpoints taken before each task, a fork's first machine made from a checkpoint, and the
checkpoints deleted with the session. Each records its history (BERTH_RECORD_HISTORY=1) in
histories/v6/ for tests/workflows/test_replay.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.models import CheckpointRequest, CheckpointSaved, ForkRequest
from sandboxes.models import SandboxInfo
from store.events import EventType
from tests.workflows import test_session as session
from tests.workflows.test_session import HISTORIES, env
from workflows.models import (
    CheckpointAsk,
    CheckpointControl,
    CheckpointRef,
    RollbackAsk,
    RollbackRef,
    SessionInput,
)

__all__ = ["env"]

V6 = HISTORIES.parent / "v6"


class Stubs(session.Stubs):
    def __init__(self) -> None:
        super().__init__()
        self.taken: list[str] = []
        self.rolled_back: list[str] = []
        self.forked: list[str] = []
        self.deleted: list[str] = []

    @activity.defn(name="TakeCheckpoint")
    async def take(self, request: CheckpointRequest) -> CheckpointSaved:
        # What ran before it: a checkpoint taken while a step runs would miss its end.
        self.taken.append(f"{request.checkpoint_id} after {len(self.commands)} commands")
        return CheckpointSaved(memory=False, size_bytes=1024)

    @activity.defn(name="RollBackSandbox")
    async def roll_back(self, request: CheckpointRequest) -> SandboxInfo:
        self.rolled_back.append(request.checkpoint_id)
        return request.sandbox

    @activity.defn(name="ForkSandbox")
    async def fork(self, request: ForkRequest) -> SandboxInfo:
        self.forked.append(request.checkpoint_id)
        return SandboxInfo(
            id=request.sandbox_id, session_id=request.session_id, provider="stub", host_id="h",
            task_queue=self.queue, template=request.template, handle="forked",
        )  # fmt: skip

    @activity.defn(name="DeleteCheckpoint")
    async def delete(self, checkpoint_id: str) -> None:
        self.deleted.append(checkpoint_id)

    def all(self) -> list[Callable[..., Any]]:
        return [*super().all(), self.take, self.roll_back, self.fork, self.delete]


def save(name: str, history: Any) -> None:
    session.save_history(name, history, V6)


async def checkpoint(handle: Any, label: str | None = None) -> CheckpointRef:
    ref: CheckpointRef = await handle.execute_update(
        "checkpoint", CheckpointAsk(memory=True, label=label), result_type=CheckpointRef
    )
    return ref


async def rollback(handle: Any, checkpoint_id: str, before: list[str]) -> RollbackRef:
    ask = RollbackAsk(checkpoint_id=checkpoint_id, tasks_before=before)
    ref: RollbackRef = await handle.execute_update("rollback", ask, result_type=RollbackRef)
    return ref


def done(stubs: Stubs, task_id: str) -> Callable[[], bool]:
    return lambda: stubs.task_statuses().get(task_id) in ("succeeded", "failed", "cancelled")


async def test_a_rollback_undoes_the_tasks_after_the_checkpoint(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    async with session.running(env, stubs, session.params(stubs)) as handle:
        first = await session.submit(env.client, handle.id, "$ echo a")
        await session.until(done(stubs, first.id))
        taken = await checkpoint(handle, "after a")
        assert taken.memory is False and taken.size_bytes == 1024
        second = await session.submit(env.client, handle.id, "$ echo b")
        await session.until(done(stubs, second.id))
        ref = await rollback(handle, taken.id, [first.id])
        assert ref.rolled_back == [second.id]
        assert stubs.rolled_back == [taken.id]
        third = await session.submit(env.client, handle.id, "$ echo c")
        await session.until(done(stubs, third.id))
        await session.end(handle)
        save("checkpoint-rollback", await handle.fetch_history())
    created = next(e.data for e in stubs.events if e.type == EventType.checkpoint_created)
    assert created["label"] == "after a" and created["state"]["finished"] == {first.id: "succeeded"}
    undone = [e.data for e in stubs.events if e.type == EventType.session_rolled_back]
    assert undone == [{"checkpoint_id": taken.id, "tasks": [second.id]}]
    # Ended without keeping its disk: its checkpoint goes with it.
    assert stubs.deleted == [taken.id]
    assert EventType.checkpoint_deleted in stubs.types()


async def test_a_checkpoint_waits_for_the_step_and_a_rollback_stops_the_task(
    env: WorkflowEnvironment,
) -> None:
    stubs = Stubs()
    async with session.running(env, stubs, session.params(stubs)) as handle:
        waiting = await session.submit(env.client, handle.id, "$ wait\n$ echo after")
        await session.until(lambda: stubs.commands == ["wait"])
        taking = asyncio.ensure_future(checkpoint(handle))
        await asyncio.sleep(0.5)
        assert not taking.done()  # between steps only
        stubs.release.set()
        taken = await taking
        # Taken once the step ended, before the next one started.
        assert stubs.taken == [f"{taken.id} after 1 commands"]
        await session.until(done(stubs, waiting.id))
        stubs.release.clear()
        running = await session.submit(env.client, handle.id, "$ wait")
        queued = await session.submit(env.client, handle.id, "$ echo next")
        await session.until(lambda: stubs.commands[-1:] == ["wait"])
        ref = await rollback(handle, taken.id, [waiting.id])
        assert stubs.cancelled == ["wait"]  # the running step was stopped
        assert ref.rolled_back == [running.id]
        await session.until(done(stubs, queued.id))  # the next task runs from there
        assert stubs.task_statuses()[queued.id] == "succeeded"
        await session.end(handle)
        save("rollback-mid-step", await handle.fetch_history())


async def test_checkpoints_before_each_task(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    params = session.params(stubs).model_copy(update={"auto_checkpoint": "before_task"})
    async with session.running(env, stubs, params) as handle:
        first = await session.submit(env.client, handle.id, "$ echo a")
        second = await session.submit(env.client, handle.id, "$ echo b")
        await session.until(done(stubs, second.id))
        await session.end(handle)
        save("auto-checkpoint", await handle.fetch_history())
    labels = [e.data["label"] for e in stubs.events if e.type == EventType.checkpoint_created]
    assert labels == ["before: $ echo a", "before: $ echo b"]
    assert [t.split()[-2] for t in stubs.taken] == ["0", "1"]
    assert first.id in stubs.task_statuses()


async def test_a_fork_starts_from_the_checkpoint(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    params = session.params(stubs).model_copy(update={"fork": "c" * 32})
    async with session.running(env, stubs, params) as handle:
        ref = await session.submit(env.client, handle.id, "$ echo forked")
        await session.until(done(stubs, ref.id))
        await session.end(handle)
        save("fork", await handle.fetch_history())
    assert stubs.forked == ["c" * 32] and not stubs.provisioned
    ready = next(e.data for e in stubs.events if e.type == EventType.sandbox_ready)
    assert ready["handle"] == "forked" and stubs.destroyed == [ready["sandbox_id"]]


async def test_a_resumed_session_keeps_its_checkpoints(env: WorkflowEnvironment) -> None:
    stubs = Stubs()
    kept = "k" * 32
    params = session.params(stubs).model_copy(update={"checkpoints": [kept]})
    async with session.running(env, stubs, params) as handle:
        ref = await session.submit(env.client, handle.id, "$ echo resumed")
        await session.until(done(stubs, ref.id))
        assert (await rollback(handle, kept, [])).rolled_back == [ref.id]
        await session.end(handle)
    assert stubs.rolled_back == [kept] and stubs.deleted == [kept]


class SlowSave(Stubs):
    """A checkpoint's save, or a rollback's new machine, under way until ``saved`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.saving, self.saved = asyncio.Event(), asyncio.Event()

    async def hold(self) -> None:
        self.saving.set()
        while not self.saved.is_set():
            activity.heartbeat()
            await asyncio.sleep(0.05)

    @activity.defn(name="TakeCheckpoint")
    async def take(self, request: CheckpointRequest) -> CheckpointSaved:
        await self.hold()
        return await super().take(request)

    @activity.defn(name="RollBackSandbox")
    async def roll_back(self, request: CheckpointRequest) -> SandboxInfo:
        await self.hold()
        self.rolled_back.append(request.checkpoint_id)
        # Made again under a new id (a VM booted from the checkpoint's disk).
        return request.sandbox.model_copy(update={"id": "remade"})


KEPT = "k" * 32


def with_kept(stubs: Stubs) -> SessionInput:
    """A resumed session's input, with its checkpoint KEPT."""
    return session.params(stubs).model_copy(update={"checkpoints": [KEPT]})


async def rolling_back(handle: Any, stubs: SlowSave) -> asyncio.Future[RollbackRef]:
    """A rollback to KEPT, its activity under way when this returns."""
    await session.until(lambda: bool(stubs.provisioned))
    rolling = asyncio.ensure_future(rollback(handle, KEPT, []))
    await asyncio.wait_for(stubs.saving.wait(), 10)
    return rolling


async def test_an_end_during_a_checkpoint_deletes_it_after_the_save(
    env: WorkflowEnvironment,
) -> None:
    """Ended while a checkpoint is being saved: the machine is not destroyed under the
    save, and the checkpoint it saved is deleted with the session, not left on the disk."""
    stubs = SlowSave()
    async with session.running(env, stubs, session.params(stubs)) as handle:
        await session.until(lambda: bool(stubs.provisioned))
        taking = asyncio.ensure_future(checkpoint(handle))
        await asyncio.wait_for(stubs.saving.wait(), 10)
        await handle.cancel()
        await asyncio.sleep(1)
        assert stubs.destroyed == []  # not under the save
        stubs.saved.set()
        taken = await taking
        await session.end(handle)
        save("end-during-checkpoint", await handle.fetch_history())
    assert stubs.deleted == [taken.id]
    assert stubs.destroyed == stubs.provisioned


async def test_an_end_during_a_rollback_destroys_the_machine_it_made(
    env: WorkflowEnvironment,
) -> None:
    stubs = SlowSave()
    async with session.running(env, stubs, with_kept(stubs)) as handle:
        rolling = await rolling_back(handle, stubs)
        await handle.cancel()
        await asyncio.sleep(1)
        stubs.saved.set()
        await rolling
        await session.end(handle)
        save("end-during-rollback", await handle.fetch_history())
    assert stubs.destroyed == ["remade"]  # the machine the rollback made, not the old one
    assert stubs.deleted == [KEPT]


async def test_an_end_during_a_rollback_cancels_the_task_queued_behind_it(
    env: WorkflowEnvironment,
) -> None:
    """The next task waits for the rollback in the queue: the session's end cancels it,
    not leaves it queued for good."""
    stubs = SlowSave()
    async with session.running(env, stubs, with_kept(stubs)) as handle:
        running = await session.submit(env.client, handle.id, "$ wait")
        queued = await session.submit(env.client, handle.id, "$ echo next")
        await session.until(lambda: stubs.commands == ["wait"])
        rolling = await rolling_back(handle, stubs)
        await asyncio.sleep(0.5)  # the running task stopped, the next one waits
        await handle.cancel()
        stubs.saved.set()
        await rolling
        await session.end(handle)
        save("end-during-rollback-with-queued", await handle.fetch_history())
    statuses = stubs.task_statuses()
    assert statuses[running.id] == "cancelled" and statuses[queued.id] == "cancelled"
    assert stubs.commands == ["wait"]


class Overlapping(Stubs):
    """Saves that take a moment, the first until ``saved`` is set; counts how many run at
    once."""

    def __init__(self) -> None:
        super().__init__()
        self.saving, self.saved = asyncio.Event(), asyncio.Event()
        self.at_once = self.most_at_once = 0

    @activity.defn(name="TakeCheckpoint")
    async def take(self, request: CheckpointRequest) -> CheckpointSaved:
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        self.saving.set()
        try:
            await self.saved.wait()
            await asyncio.sleep(0.3)
        finally:
            self.at_once -= 1
        return await super().take(request)


async def test_checkpoints_waiting_for_the_machine_take_it_one_at_a_time(
    env: WorkflowEnvironment,
) -> None:
    """Two checkpoints waiting while a third has the machine: once it is done, one takes
    the machine, the other waits again (both woken at once, both took it)."""
    stubs = Overlapping()
    async with session.running(env, stubs, session.params(stubs)) as handle:
        await session.until(lambda: bool(stubs.provisioned))
        first = asyncio.ensure_future(checkpoint(handle))
        await asyncio.wait_for(stubs.saving.wait(), 10)
        waiting = [asyncio.ensure_future(checkpoint(handle)) for _ in range(2)]
        await asyncio.sleep(0.5)
        stubs.saved.set()
        refs = await asyncio.gather(first, *waiting)
        await session.end(handle)
        save("checkpoints-one-at-a-time", await handle.fetch_history())
    assert stubs.most_at_once == 1
    assert sorted(stubs.deleted) == sorted(r.id for r in refs)


async def test_a_checkpoint_deleted_during_a_rollback_to_it_goes_once_the_rollback_is_done(
    env: WorkflowEnvironment,
) -> None:
    stubs = SlowSave()
    async with session.running(env, stubs, with_kept(stubs)) as handle:
        rolling = await rolling_back(handle, stubs)
        deleting = asyncio.ensure_future(
            handle.execute_update("delete_checkpoint", CheckpointControl(checkpoint_id=KEPT))
        )
        await asyncio.sleep(1)
        assert stubs.deleted == []  # not from under the rollback
        stubs.saved.set()
        await rolling
        await deleting
        assert stubs.deleted == [KEPT] and stubs.rolled_back == [KEPT]
        await session.end(handle)
        save("delete-during-rollback", await handle.fetch_history())


class SlowHibernate(Stubs):
    """A hibernate that lasts until ``hibernated`` is set; what ran, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.hibernating, self.hibernated = asyncio.Event(), asyncio.Event()
        self.order: list[str] = []

    @activity.defn(name="HibernateSandbox")
    async def hibernate(self, sandbox: SandboxInfo) -> None:
        self.hibernating.set()
        while not self.hibernated.is_set():
            activity.heartbeat()
            await asyncio.sleep(0.05)
        self.order.append("hibernated")

    @activity.defn(name="WakeSandbox")
    async def wake(self, sandbox: SandboxInfo) -> None:
        self.order.append("woken")

    @activity.defn(name="TakeCheckpoint")
    async def take(self, request: CheckpointRequest) -> CheckpointSaved:
        self.order.append("taken")
        return await super().take(request)


async def test_a_checkpoint_during_a_hibernate_waits_for_it_and_wakes_the_machine(
    env: WorkflowEnvironment,
) -> None:
    """Not saved while the idle machine is being suspended: after it, woken first."""
    stubs = SlowHibernate()
    params = session.params(stubs).model_copy(update={"hibernate_after_s": 0.5})
    async with session.running(env, stubs, params) as handle:
        await asyncio.wait_for(stubs.hibernating.wait(), 10)
        taking = asyncio.ensure_future(checkpoint(handle))
        await asyncio.sleep(1)
        assert stubs.order == []  # not under the hibernate
        stubs.hibernated.set()
        await taking
        await session.end(handle)
        save("checkpoint-during-hibernate", await handle.fetch_history())
    assert stubs.order == ["hibernated", "woken", "taken"]


async def test_a_checkpoint_is_deleted_on_the_host_that_keeps_it(env: WorkflowEnvironment) -> None:
    """The session's machine is on another host than the session's own queue (restored
    where its disk was kept, or moved): its checkpoints are kept there, and deleted there."""
    stubs, keeper = Stubs(), Stubs()
    keeper.events = stubs.events  # one event log, whichever host records
    kept = SandboxInfo(
        id=uuid.uuid4().hex, session_id="s", provider="stub", host_id="keeper",
        task_queue=keeper.queue, template="default", handle="h0",
    )  # fmt: skip
    resumed = session.params(stubs).model_copy(update={"restore": kept})
    async with (
        Worker(env.client, task_queue=keeper.queue, activities=keeper.all()),
        session.running(env, stubs, resumed) as handle,
    ):
        taken = await checkpoint(handle)
        await handle.execute_update("delete_checkpoint", CheckpointControl(checkpoint_id=taken.id))
        await session.end(handle)
        save("checkpoint-hosts", await handle.fetch_history())
    assert [t.split()[0] for t in keeper.taken] == [taken.id]
    assert keeper.deleted == [taken.id] and stubs.deleted == []
