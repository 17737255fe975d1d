"""A warm pool's end, on the Temporal dev server with stub activities (the edge): a stop
destroys the ready members and cancels boots in flight without waiting for them or backing
off, and a worker starting next to a pool still ending does not take it for its live pool."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import vm_templates
from activities.models import SandboxRequest, pool_workflow_id
from berth.worker import sample_pools, start_pools
from config.settings import Settings
from sandboxes.models import SandboxInfo
from tests.workflows.test_session import env, save_history
from workflows.pool import PoolInput, PoolState, SandboxPool

__all__ = ["env"]  # a fixture of test_workflow's: the Temporal dev server


class Host:
    """Stub ProvisionSandbox and DestroySandbox: the first ``quick`` boots succeed at once,
    later ones hang until cancelled (then destroy what they made, after ``linger_s``)."""

    def __init__(self, queue: str, quick: int, linger_s: float = 0.0) -> None:
        self.queue, self.quick, self.linger_s = queue, quick, linger_s
        self.booted: list[str] = []
        self.cancelled: list[str] = []
        self.destroyed: list[str] = []

    @activity.defn(name="ProvisionSandbox")
    async def provision(self, request: SandboxRequest) -> SandboxInfo:
        self.booted.append(request.sandbox_id)
        if len(self.booted) > self.quick:
            try:
                while True:
                    activity.heartbeat()
                    await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                self.cancelled.append(request.sandbox_id)
                await asyncio.sleep(self.linger_s)
                self.destroyed.append(request.sandbox_id)
                raise
        return SandboxInfo(
            id=request.sandbox_id, session_id=request.session_id, provider="stub",
            host_id="h", task_queue=self.queue, template=request.template, handle="vm",
        )  # fmt: skip

    @activity.defn(name="DestroySandbox")
    async def destroy(self, sandbox: SandboxInfo) -> None:
        self.destroyed.append(sandbox.id)


async def start_pool(client: Client, queue: str, **extra: Any) -> WorkflowHandle[Any, Any]:
    """A pool of one VM of the default template on ``queue``, its input's ``extra`` set."""
    return await client.start_workflow(
        SandboxPool.run,
        PoolInput(
            template=vm_templates.DEFAULT, host_task_queue=queue, min_size=1, max_size=1,
            **extra,
        ),
        id=f"pool-{queue}",
        task_queue=queue,
    )  # fmt: skip


async def until(client: Client, workflow_id: str) -> PoolState:
    """The pool's state once a boot hangs (one ready, one booting)."""
    handle = client.get_workflow_handle(workflow_id)
    async with asyncio.timeout(30):
        while True:
            state: PoolState = await handle.query(SandboxPool.state)
            if state.ready and state.booting:
                return state
            await asyncio.sleep(0.1)


@pytest.fixture
async def host(env: WorkflowEnvironment) -> AsyncIterator[tuple[Host, Settings]]:
    settings = Settings(
        sandbox_provider="libvirt", host_id=f"pooltest-{uuid.uuid4().hex[:8]}",
        vm_pool_min=2, vm_pool_max=2,
    )  # fmt: skip
    stubs = Host(settings.host_task_queue, quick=1, linger_s=1.0)
    async with Worker(
        env.client,
        task_queue=settings.host_task_queue,
        workflows=[SandboxPool],
        activities=[stubs.provision, stubs.destroy],
        max_heartbeat_throttle_interval=timedelta(seconds=1),  # as berth.worker's
    ):
        yield stubs, settings


async def test_a_stop_cancels_a_boot_in_flight_and_destroys_the_ready(
    env: WorkflowEnvironment, host: tuple[Host, Settings]
) -> None:
    stubs, settings = host
    workflow_id = pool_workflow_id(settings.host_id, vm_templates.DEFAULT)
    pool = await env.client.start_workflow(
        SandboxPool.run,
        PoolInput(
            template=vm_templates.DEFAULT, host_task_queue=settings.host_task_queue,
            min_size=2, max_size=2,
        ),
        id=workflow_id,
        task_queue=settings.host_task_queue,
    )  # fmt: skip
    state = await until(env.client, workflow_id)
    await pool.signal(SandboxPool.stop)
    await asyncio.wait_for(pool.result(), 20)
    history = await pool.fetch_history()
    save_history("pool-stop", history)
    kinds = [event.event_type for event in history.events]
    stopped = kinds.index(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
    # No back-off waited out: the only timer after the stop bounds the wait for the boot,
    # which ends well within it.
    assert EventType.EVENT_TYPE_TIMER_FIRED not in kinds[stopped:]
    ready, booting = state.ready[0].id, state.booting[0]
    assert stubs.cancelled == [booting]
    # The cancel was waited for: what the boot made is gone before the pool ended.
    assert sorted(stubs.destroyed) == sorted([ready, booting])


async def test_a_starting_worker_waits_for_a_pool_still_ending_then_starts_a_new_one(
    env: WorkflowEnvironment, host: tuple[Host, Settings]
) -> None:
    stubs, settings = host
    stubs.linger_s = 3.0  # the boot's removal outlasts the earlier worker's stop
    await start_pools(env.client, settings)
    workflow_id = pool_workflow_id(settings.host_id, vm_templates.DEFAULT)
    await until(env.client, workflow_id)
    old = env.client.get_workflow_handle(workflow_id)
    first_run = (await old.describe()).run_id
    await old.signal(SandboxPool.stop)

    await start_pools(env.client, settings)  # the next worker's start
    new = env.client.get_workflow_handle(workflow_id)
    described = await new.describe()
    assert described.run_id != first_run and described.status == WorkflowExecutionStatus.RUNNING
    assert not (await new.query(SandboxPool.state)).stopping
    finished = await env.client.get_workflow_handle(workflow_id, run_id=first_run).describe()
    assert finished.status == WorkflowExecutionStatus.COMPLETED
    await new.signal(SandboxPool.stop)
    await new.result()


async def test_a_stop_ends_a_failed_boots_back_off(env: WorkflowEnvironment) -> None:
    """Durability review: a boot that failed before the stop slept out its back-off (up to
    300 s), so the pool outlived the worker's wait for it and its next start found no pool."""
    queue = f"pooltest-{uuid.uuid4().hex[:8]}"
    boots: list[str] = []

    @activity.defn(name="ProvisionSandbox")
    async def provision(request: SandboxRequest) -> SandboxInfo:
        boots.append(request.sandbox_id)
        raise ApplicationError("the template is broken", non_retryable=True)

    @activity.defn(name="DestroySandbox")
    async def destroy(sandbox: SandboxInfo) -> None:
        pass

    # Eight failures in a row already: the next one backs off for the longest (300 s).
    carried = PoolState(template=vm_templates.DEFAULT, target=1, boot_failures=8)
    async with Worker(
        env.client, task_queue=queue, workflows=[SandboxPool], activities=[provision, destroy]
    ):
        pool = await start_pool(env.client, queue, carried=carried)
        async with asyncio.timeout(20):
            while True:  # the failure is counted: the boot is in its back-off
                if (await pool.query(SandboxPool.state)).boot_failures == 9:
                    break
                await asyncio.sleep(0.1)
        await pool.signal(SandboxPool.stop)
        await asyncio.wait_for(pool.result(), 10)
    assert len(boots) == 1


async def test_the_worker_samples_each_pools_depth_into_its_gauges(
    env: WorkflowEnvironment, host: tuple[Host, Settings]
) -> None:
    _, settings = host
    await start_pools(env.client, settings)
    workflow_id = pool_workflow_id(settings.host_id, vm_templates.DEFAULT)
    state = await until(env.client, workflow_id)
    stop = asyncio.Event()
    sampling = asyncio.create_task(sample_pools(env.client, settings, stop))
    labels = {"template": vm_templates.DEFAULT}
    async with asyncio.timeout(10):
        while REGISTRY.get_sample_value("berth_pool_ready", labels) != len(state.ready):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert REGISTRY.get_sample_value("berth_pool_booting", labels) == len(state.booting)
    stop.set()
    await asyncio.wait_for(sampling, 5)
    pool = env.client.get_workflow_handle(workflow_id)
    await pool.signal(SandboxPool.stop)
    await pool.result()


@workflow.defn(name="NotAPool")
class NotAPool:
    """A workflow under a pool's id that answers no pool query: as a pool whose workflow task
    fails does."""

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)


async def test_a_pool_that_cannot_be_asked_does_not_stop_the_worker(
    env: WorkflowEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 10: the start's query of the pool was unguarded, so the worker died at every
    start (a crash loop) while a pool did not answer."""
    settings = Settings(
        sandbox_provider="libvirt", host_id=f"pooltest-{uuid.uuid4().hex[:8]}",
        vm_pool_min=1, vm_pool_max=1,
    )  # fmt: skip
    workflow_id = pool_workflow_id(settings.host_id, vm_templates.DEFAULT)
    async with Worker(
        env.client,
        task_queue=settings.host_task_queue,
        workflows=[NotAPool],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        squatter = await env.client.start_workflow(
            NotAPool.run, id=workflow_id, task_queue=settings.host_task_queue
        )
        await start_pools(env.client, settings)  # raised WorkflowQueryFailedError before
        await squatter.terminate(reason="test over")
    assert "pool did not start" in caplog.text


class Undeletable(Host):
    """A host whose VMs boot at once and can never be removed."""

    def __init__(self, queue: str, quick: int) -> None:
        super().__init__(queue, quick)
        self.removals: list[str] = []

    @activity.defn(name="DestroySandbox")
    async def destroy(self, sandbox: SandboxInfo) -> None:
        self.removals.append(sandbox.id)
        raise RuntimeError("the hypervisor does not answer")


async def test_a_vm_that_cannot_be_removed_does_not_keep_the_pool_stopping(
    env: WorkflowEnvironment,
) -> None:
    """Defect 10: the end retried a failing removal forever, the pool stayed 'stopping', and
    every later worker start waited for it and then ran without a pool."""
    queue = f"pooltest-{uuid.uuid4().hex[:8]}"
    host = Undeletable(queue, quick=100)
    async with Worker(
        env.client, task_queue=queue, workflows=[SandboxPool],
        activities=[host.provision, host.destroy],
    ):  # fmt: skip
        pool = await start_pool(env.client, queue, stop_timeout_s=3)
        async with asyncio.timeout(20):
            while not (await pool.query(SandboxPool.state)).ready:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await pool.signal(SandboxPool.stop)
        await asyncio.wait_for(pool.result(), 30)  # waited forever before
        state = await pool.query(SandboxPool.state)
        history = await pool.fetch_history()
        save_history("pool-stop-undeletable", history)
        memo = await (await pool.describe()).memo_value("abandoned", type_hint=list[str])
    assert host.removals and state.abandoned == [host.removals[0]] and memo == state.abandoned
    kinds = [event.event_type for event in history.events]
    assert EventType.EVENT_TYPE_WORKFLOW_PROPERTIES_MODIFIED in kinds
