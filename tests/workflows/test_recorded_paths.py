"""Paths that had no recorded history (issue 17, 9): a session's end that keeps its disk,
a resumed session that restores it, and a warm pool's claims, refills and continue-as-new.
Each runs on the Temporal dev server with stub activities (the edge), checks what it did,
and records its history (BERTH_RECORD_HISTORY=1) for tests/workflows/test_replay.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.models import CLAIM_ANSWER, POOL_CLAIM_UPDATE, PoolClaim
from sandboxes.models import SandboxInfo
from store.events import EventType
from tests.workflows import test_session as session
from tests.workflows.test_pool import Host, start_pool
from tests.workflows.test_session import env, save_history, short_env
from workflows.pool import PoolState, SandboxPool

__all__ = ["env", "short_env"]


async def test_an_end_that_keeps_the_disk(env: WorkflowEnvironment) -> None:
    stubs = session.Stubs()
    async with session.running(env, stubs, session.params(stubs)) as handle:
        ref = await session.submit(env.client, handle.id, "$ echo kept")
        await session.until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await handle.signal("preserve_sandbox")
        await session.end(handle)
        save_history("preserve", await handle.fetch_history())
    assert stubs.preserved == stubs.provisioned and not stubs.destroyed
    assert EventType.sandbox_preserved in stubs.types()


async def test_a_resumed_session_restores_the_kept_disk(env: WorkflowEnvironment) -> None:
    stubs = session.Stubs()
    kept = SandboxInfo(
        id=uuid.uuid4().hex, session_id="s", provider="stub", host_id="h",
        task_queue=stubs.queue, template="default", handle="h0",
    )  # fmt: skip
    async with session.running(
        env, stubs, session.params(stubs).model_copy(update={"restore": kept})
    ) as handle:
        ref = await session.submit(env.client, handle.id, "$ echo back")
        await session.until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await session.end(handle)
        save_history("restore", await handle.fetch_history())
    assert stubs.restored == [kept.id] and not stubs.provisioned
    restored = [e.data for e in stubs.events if e.type == EventType.sandbox_restored]
    assert restored[0]["preserved_id"] == kept.id
    assert stubs.destroyed == [restored[0]["sandbox_id"]]


async def test_a_kept_disk_is_restored_on_the_host_that_keeps_it(env: WorkflowEnvironment) -> None:
    """The session's own host queue is not where the disk is: the restore, and the restored
    machine's steps and end, go to the kept disk's host."""
    stubs, keeper = session.Stubs(), session.Stubs()
    kept = SandboxInfo(
        id=uuid.uuid4().hex, session_id="s", provider="stub", host_id="keeper",
        task_queue=keeper.queue, template="default", handle="h0",
    )  # fmt: skip
    keeper.events = stubs.events  # one event log, whichever host records
    resumed = session.params(stubs).model_copy(update={"restore": kept})
    async with (
        Worker(env.client, task_queue=keeper.queue, activities=keeper.all()),
        session.running(env, stubs, resumed) as handle,
    ):
        ref = await session.submit(env.client, handle.id, "$ echo back")
        await session.until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await session.end(handle)
        save_history("restore-on-its-host", await handle.fetch_history())
    assert keeper.restored == [kept.id] and stubs.restored == []
    assert keeper.commands == ["echo back"] and len(keeper.destroyed) == 1


@pytest.fixture
async def pool_host(env: WorkflowEnvironment) -> AsyncIterator[Host]:
    host = Host(f"pooltest-{uuid.uuid4().hex[:8]}", quick=100)  # every boot succeeds at once
    async with Worker(
        env.client,
        task_queue=host.queue,
        workflows=[SandboxPool],
        activities=[host.provision, host.destroy],
        max_heartbeat_throttle_interval=timedelta(seconds=1),
    ):
        yield host


async def ready(pool: WorkflowHandle) -> PoolState:  # type: ignore[type-arg]
    """The pool's state once it has a VM ready and none booting."""
    async with asyncio.timeout(30):
        while True:
            state: PoolState = await pool.query(SandboxPool.state)
            if state.ready and not state.booting:
                return state
            await asyncio.sleep(0.1)


async def claim(pool: WorkflowHandle, key: str) -> SandboxInfo | None:  # type: ignore[type-arg]
    answer: SandboxInfo | None = await pool.execute_update(
        POOL_CLAIM_UPDATE, PoolClaim(session_id=key), result_type=CLAIM_ANSWER
    )
    return answer


async def test_a_pool_hands_out_refills_and_answers_a_retried_claim_alike(
    env: WorkflowEnvironment, pool_host: Host
) -> None:
    pool = await start_pool(env.client, pool_host.queue)
    first = (await ready(pool)).ready[0]
    assert await claim(pool, "s1/0") == first
    assert await claim(pool, "s1/0") == first  # a retried claim: the same VM
    refilled = (await ready(pool)).ready[0]
    assert refilled.id != first.id and pool_host.booted == [first.id, refilled.id]
    await pool.signal(SandboxPool.stop)
    await asyncio.wait_for(pool.result(), 20)
    save_history("pool-claim-refill", await pool.fetch_history())
    # The claimed VM is its session's to destroy; the pool removes the one it still held.
    assert pool_host.destroyed == [refilled.id]


async def test_a_pool_continues_as_new_with_its_members(short_env: WorkflowEnvironment) -> None:
    env, host = short_env, Host(f"pooltest-{uuid.uuid4().hex[:8]}", quick=100)
    async with Worker(
        env.client, task_queue=host.queue, workflows=[SandboxPool],
        activities=[host.provision, host.destroy],
    ):  # fmt: skip
        pool = await start_pool(env.client, host.queue)
        first_run = (await pool.describe()).run_id
        for n in range(30):
            await ready(pool)
            assert await claim(pool, f"s{n}/0") is not None
            if (await pool.describe()).run_id != first_run:
                break
        latest = env.client.get_workflow_handle(pool.id)
        assert (await latest.describe()).run_id != first_run, "never continued as new"
        state = await ready(latest)
        assert state.hits == n + 1  # carried over, with the claims it remembers
        await latest.signal(SandboxPool.stop)
        await asyncio.wait_for(latest.result(), 20)
        save_history(
            "pool-continue-as-new",
            await env.client.get_workflow_handle(pool.id, run_id=first_run).fetch_history(),
        )
        save_history("pool-continue-as-new-resumed", await latest.fetch_history())
    assert host.destroyed == [state.ready[0].id]
