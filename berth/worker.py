"""The worker process of one sandbox host: the Temporal worker for its sessions and the
guest gateway that its sandboxes dial into.

A session lives on the host that holds its sandbox: its workflow and every activity it
runs share the host's task queue ``berth-host-<id>``. Sharing the queue lets Temporal hand
each step's activity to this worker in the same answer that takes the workflow's command
(eager dispatch), which measured 25 ms a step against 76 ms across two queues.
Every worker also serves the fleet (berth/fleet.py): the registry read on the fleet's queue,
and the sessions of a host that reads lost, whose queue it polls until they have moved.
The host also reconciles its machines with the sessions that own them, at start and then
periodically, so a machine whose session is gone does not run on, and sweeps the session
rows whose workflow is over (workflows/sweeper.py), so no row stays live without one. Its
watch and its reconciliation judge every machine the database places on this host by what
the machine is (stopped, gone), and tell its session, which replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

import vm_templates
from activities.checkpoints import CheckpointActivities
from activities.fleet import FleetActivities
from activities.models import FLEET_TASK_QUEUE, pool_workflow_id
from activities.observed import Observed
from activities.planning import PlanningActivities
from activities.progress import ProgressActivities
from activities.sandbox import SandboxActivities
from activities.vm import VmActivities
from activities.webhooks import WebhookActivities
from berth.fleet import Rescue
from berth.host import make_gateway, make_provider, open_host
from berth.registry import OnChange, heartbeat_forever, register
from config.keys import payload_keys, relay_token
from config.settings import Settings, get_settings
from llm.proxy import LLMProxy
from sandboxes.kept import SWEEP_EVERY_S as KEPT_SWEEP_EVERY_S
from sandboxes.kept import KeptDisks
from sandboxes.models import Machine, MachineUsage
from sandboxes.monitor import Died, Placed, Placement, Sampled, watch
from sandboxes.reconcile import Owner, reconcile_forever
from sandboxes.relay import Relay
from store.artifacts import ArtifactStore
from store.db import get_engine, migrate
from store.models import HostState, utcnow
from store.usage import placed_sandboxes, record_usage
from telemetry import logs, metrics, tracing
from workflows.client import connect, workflow_id
from workflows.models import SandboxDeath
from workflows.pool import PoolInput, SandboxPool, pool_member
from workflows.session import SessionWorkflow
from workflows.sweeper import Sweeper
from workflows.webhooks import Dispatcher, WebhookDelivery

log = logging.getLogger("berth.worker")

RECONCILE_EVERY_S = 60.0
POOL_SAMPLE_EVERY_S = 10.0
# Within the supervisor's grace for a stopping worker (15 s): a VM's removal takes ~4 s.
POOL_STOP_TIMEOUT_S = 10.0


def temporal_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime serving the SDK's own metrics (task slots, polls, latencies) on
    BERTH_TEMPORAL_METRICS_PORT; None (the default runtime) when that is off."""
    if not settings.temporal_metrics_port:
        return None
    address = f"{settings.metrics_host}:{settings.temporal_metrics_port}"
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))
    except ValueError as exc:  # the port taken: a worker without them beats none at all
        log.error("the Temporal SDK's metrics are off: %s (BERTH_TEMPORAL_METRICS_PORT)", exc)
        return None


def session_owner(client: Client, host_id: str) -> Owner:
    """The sandbox id a live session owns, asked of its workflow; for a warm pool's VM, its
    own id while its pool holds it."""

    async def owner(session_id: str) -> str | None:
        member = pool_member(session_id)
        workflow = pool_workflow_id(host_id, member[0]) if member else workflow_id(session_id)
        handle = client.get_workflow_handle(workflow)
        try:
            described = await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        if described.status != WorkflowExecutionStatus.RUNNING:
            return None
        if member:
            pool = await handle.query(SandboxPool.state)
            return member[1] if pool.owns(member[1]) else None
        state = await handle.query(SessionWorkflow.state)
        return state.sandbox.id if state.sandbox else None

    return owner


def sandbox_deaths(client: Client) -> Died:
    """Tell a session that its sandbox's machine died (a pool's VM: its claim's health
    check finds it)."""

    async def died(machine: Machine, reason: str) -> None:
        if pool_member(machine.session_id):
            return
        handle = client.get_workflow_handle(workflow_id(machine.session_id))
        death = SandboxDeath(sandbox_id=machine.sandbox_id, detail=reason)
        try:
            await handle.signal(SessionWorkflow.sandbox_died, death)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise  # the watch tells it again on its next pass
            log.info("session %s is over: not told of its sandbox's death", machine.session_id)

    return died


def placement(engine: Engine, host_id: str) -> Placement:
    """The sandboxes of live sessions that the database places on this host: watched and
    reconciled by what their machines are, whether or not their guests talk to this worker."""

    async def placed() -> list[Placed]:
        rows = await asyncio.to_thread(placed_sandboxes, engine, host_id)
        return [Placed(sandbox_id=r.id, session_id=r.session_id, handle=r.handle) for r in rows]

    return placed


def usage_recorder(engine: Engine) -> Sampled:
    """Each sample into the database (the dashboard's) and this host's gauges."""

    async def sampled(usage: dict[str, MachineUsage], machines: list[Machine]) -> None:
        rows = {sid: (u.cpu_percent, u.memory_mb) for sid, u in usage.items()}
        sessions = {m.sandbox_id: m.session_id for m in machines}
        metrics.sandbox_usage(
            {
                sessions[sid]: (u.cpu_percent, u.memory_mb, u.disk_mb)
                for sid, u in usage.items()
                if sid in sessions
            }
        )
        await asyncio.to_thread(record_usage, engine, rows)

    return sampled


async def start_pools(client: Client, settings: Settings) -> None:
    """One warm pool per template, where VMs can change owner (libvirt); an existing one
    carries on."""
    if not settings.warm_pool:
        return
    for template in vm_templates.names():
        params = PoolInput(
            template=template,
            host_task_queue=settings.host_task_queue,
            min_size=min(settings.vm_pool_min, settings.vm_pool_max),
            max_size=settings.vm_pool_max,
        )
        try:
            await start_pool(client, settings, params)
        except (RPCError, WorkflowQueryFailedError) as exc:
            # A pool that cannot be asked (its workflow task failing, say) must not stop the
            # worker: it would start again, ask again, and crash-loop, sessions and all.
            log.warning(
                "the %r pool did not start: %s; its sessions create VMs cold", template, exc
            )


async def start_pool(client: Client, settings: Settings, params: PoolInput) -> None:
    for _ in range(2):
        pool = await client.start_workflow(
            SandboxPool.run,
            params,
            id=pool_workflow_id(settings.host_id, params.template),
            task_queue=settings.host_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        if not (await pool.query(SandboxPool.state)).stopping:
            return
        # An earlier worker's stop did not see it end: it does now, then a new one.
        try:
            await asyncio.wait_for(pool.result(), POOL_STOP_TIMEOUT_S * 6)
        except (TimeoutError, WorkflowFailureError) as exc:
            log.warning("pool %s still ending: %r; sessions create VMs cold", pool.id, exc)
            return


async def sample_pools(client: Client, settings: Settings, stop: asyncio.Event) -> None:
    """The warm pools' depth in this host's gauges, asked of their workflows now and then."""
    if not settings.warm_pool:
        return
    while not stop.is_set():
        for template in vm_templates.names():
            handle = client.get_workflow_handle(pool_workflow_id(settings.host_id, template))
            try:
                state = await handle.query(SandboxPool.state)
            except (RPCError, WorkflowQueryFailedError) as exc:
                log.info("pool %s not sampled: %s", handle.id, exc)
                continue
            metrics.POOL_READY.labels(template).set(len(state.ready))
            metrics.POOL_BOOTING.labels(template).set(len(state.booting))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POOL_SAMPLE_EVERY_S)


async def stop_pools(client: Client, settings: Settings, timeout_s: float) -> None:
    """End the warm pools, which destroy their VMs: a pool outliving its worker's stop would
    hold VMs (their memory, their CPU) for a data dir that may never run again, while a
    restart boots new ones in seconds. Sessions' machines carry on (their sessions do)."""
    if not settings.warm_pool:
        return
    pools = [
        client.get_workflow_handle(pool_workflow_id(settings.host_id, template))
        for template in vm_templates.names()
    ]

    async def end(pool: WorkflowHandle[Any, Any]) -> None:
        try:
            await pool.signal(SandboxPool.stop)
            await pool.result()
        except (RPCError, WorkflowFailureError) as exc:
            log.info("pool %s not ended: %s", pool.id, exc)

    try:
        await asyncio.wait_for(asyncio.gather(*(end(pool) for pool in pools)), timeout_s)
    except TimeoutError:
        log.warning("the warm pools did not end within %.0f s; their VMs are left", timeout_s)


def tuning(settings: Settings) -> dict[str, Any]:
    """The worker's Temporal tuning (BERTH_WORKER_*); None leaves Temporal's default."""
    return {
        "max_concurrent_workflow_tasks": settings.worker_max_concurrent_workflow_tasks,
        "max_concurrent_activities": settings.worker_max_concurrent_activities,
        "max_concurrent_local_activities": settings.worker_max_concurrent_local_activities,
        "max_cached_workflows": settings.worker_max_cached_workflows,
    }


def warm_pools_follow(client: Client, settings: Settings) -> OnChange:
    """A host being drained ends its warm pools (their VMs with them): it takes no new
    sessions, so VMs kept ready there would wait for nobody. Undrained, they start again."""

    async def follow(state: HostState) -> None:
        if state == HostState.draining:
            await stop_pools(client, settings, POOL_STOP_TIMEOUT_S)
        else:
            await start_pools(client, settings)

    return follow


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    migrate(settings.db_url)
    engine = get_engine(settings.db_url)
    client = await connect(settings, temporal_runtime(settings))
    if settings.worker_metrics_port:
        try:
            metrics.serve(settings.metrics_host, settings.worker_metrics_port)
        except OSError as exc:  # as above: the sandboxes matter more than their figures
            log.error("this worker's metrics are off: %s (BERTH_WORKER_METRICS_PORT)", exc)
    gateway = make_gateway(settings)
    provider = make_provider(settings, gateway)
    listen = await open_host(settings, gateway, provider)
    relay = Relay(gateway, relay_token(settings))
    await relay.start(settings.relay_host, settings.relay_port)
    progress = ProgressActivities(engine)
    planning = PlanningActivities(LLMProxy(settings, engine))
    artifacts = ArtifactStore(settings.artifacts_dir, settings.artifact_max_bytes)
    sandbox = SandboxActivities(
        provider,
        engine,
        settings.sandbox_connect_timeout_s,
        artifacts,
        command_policy_path=settings.command_policy_path,
    )
    vm = VmActivities(provider, client, settings.sandbox_connect_timeout_s)
    hooks = WebhookActivities(
        engine,
        payload_keys(settings),
        settings.webhook_allow_private,
        settings.webhook_timeout_s,
    )
    saved = CheckpointActivities(
        provider, settings.sandbox_connect_timeout_s, engine, settings.kept_bytes_per_user
    )
    with ThreadPoolExecutor(max_workers=16) as executor:
        host = Worker(
            client,
            task_queue=settings.host_task_queue,
            workflows=[SessionWorkflow, SandboxPool, WebhookDelivery],
            activities=[
                progress.record,
                planning.plan,
                planning.verify,
                sandbox.provision,
                sandbox.run_step,
                sandbox.stop_step,
                sandbox.check,
                sandbox.destroy,
                vm.claim,
                vm.assign,
                vm.preserve,
                vm.restore,
                vm.hibernate,
                vm.wake,
                hooks.deliver,
                saved.take,
                saved.roll_back,
                saved.fork,
                saved.delete,
            ],
            activity_executor=executor,
            **tuning(settings),
            # Cancelling a step reaches it through a heartbeat: send one every second.
            max_heartbeat_throttle_interval=timedelta(seconds=1),
            interceptors=[Observed()],
        )
        # The fleet's queue, every worker's: the registry read of a session placed anew.
        fleet = Worker(
            client,
            task_queue=FLEET_TASK_QUEUE,
            activities=[FleetActivities(engine, settings.host_lost_after_s).read],
        )
        rescue = Rescue(client, engine, settings, [progress.record], executor)
        placed = placement(engine, settings.host_id)
        reconciler = asyncio.create_task(
            reconcile_forever(
                provider,
                session_owner(client, settings.host_id),
                RECONCILE_EVERY_S,
                stop,
                on_death=sandbox_deaths(client),
                placement=placed,
            )
        )
        sweeper = Sweeper(
            client, engine, settings.session_sweep_batch, settings.session_sweep_grace_s
        )
        sweeping = asyncio.create_task(sweeper.forever(settings.session_sweep_every_s, stop))
        sampling = asyncio.create_task(sample_pools(client, settings, stop))
        dispatcher = Dispatcher(
            client,
            engine,
            settings.host_task_queue,
            settings.webhook_max_attempts,
            settings.webhook_timeout_s,
            settings.webhook_keep_days,
        )
        dispatching = asyncio.create_task(
            dispatcher.forever(settings.webhook_dispatch_every_s, stop)
        )
        kept = KeptDisks(provider, engine, settings.kept_max_age_days)
        keeping = asyncio.create_task(kept.forever(KEPT_SWEEP_EVERY_S, stop))
        watcher = asyncio.create_task(
            watch(
                provider,
                sandbox_deaths(client),
                usage_recorder(engine),
                stop,
                silence_s=settings.guest_silence_s,
                placement=placed,
            )
        )
        async with host, fleet:
            started_at = utcnow()
            state = await register(settings, engine, provider, started_at)
            if state == HostState.active:  # a draining host keeps no warm pool
                await start_pools(client, settings)
            heart = asyncio.create_task(
                heartbeat_forever(
                    settings, engine, provider, started_at, state,
                    warm_pools_follow(client, settings), stop,
                )
            )  # fmt: skip
            rescuing = asyncio.create_task(rescue.forever(stop))
            log.info(
                "worker up: queue %s, guest gateway on %s:%d",
                settings.host_task_queue, listen, settings.gateway_port,
            )  # fmt: skip
            await stop.wait()
            log.info("worker stopping")
            await stop_pools(client, settings, POOL_STOP_TIMEOUT_S)
            await heart
            await rescuing
        await reconciler
        await watcher
        await sweeping
        await sampling
        await dispatching
        await keeping
    await relay.stop()
    await gateway.stop()
    await provider.close()


def run() -> None:
    """This host's worker until SIGINT or SIGTERM, which stop it cleanly."""
    settings = get_settings()
    logs.configure("worker", settings.log_format)
    tracing.configure("worker", os.environ)

    async def until_signalled() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(until_signalled())
    tracing.shutdown()
