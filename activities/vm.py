"""Activities of a session's VM beyond the basic sandbox ones: claiming a warm pool's VM
(the pool hands one out and the host checks it; the session records it as its own, then has
it relabelled), and hibernating and waking it. They run on the VM's host queue."""

from __future__ import annotations

import asyncio
import logging

from temporalio import activity
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from activities.heartbeat import heartbeating
from activities.models import (
    CLAIM_ANSWER,
    POOL_CLAIM_UPDATE,
    ClaimRequest,
    PoolClaim,
    RestoreRequest,
    pool_workflow_id,
)
from sandboxes.gateway import SandboxDied
from sandboxes.models import SandboxInfo
from sandboxes.provider import SandboxProvider
from telemetry.metrics import POOL_CLAIMS

log = logging.getLogger("berth.pool")

# Unhealthy members handed out in a row before the claim gives up (a cold create follows).
CLAIM_TRIES = 3


class VmActivities:
    def __init__(self, provider: SandboxProvider, client: Client, connect_timeout_s: float) -> None:
        self.provider = provider
        self.client = client
        self.connect_timeout_s = connect_timeout_s

    @activity.defn(name="ClaimSandbox")
    async def claim(self, request: ClaimRequest) -> SandboxInfo | None:
        """A ready, healthy VM from the template's pool, for the session; None when the pool
        is empty, missing or only held broken VMs: the caller then creates one cold.

        The machine still carries its pool label, and the pool still owns it (reconciliation
        keeps it): the session records it as its sandbox first, then relabels it (assign),
        so at no moment does the machine belong to nobody."""
        pool = self.client.get_workflow_handle(
            pool_workflow_id(self.provider.host_id, request.template)
        )
        for attempt in range(CLAIM_TRIES):
            # Keyed by claim and try: a retried activity gets its VM again, a try after a
            # broken VM gets another.
            key = f"{request.claim or request.session_id}/{attempt}"
            try:
                answer = await pool.execute_update(
                    POOL_CLAIM_UPDATE, PoolClaim(session_id=key), result_type=CLAIM_ANSWER
                )
            except (RPCError, WorkflowUpdateFailedError) as exc:
                log.warning("no pool for template %r: %s", request.template, exc)
                return None
            if answer is None:
                POOL_CLAIMS.labels(request.template, "miss").inc()
                return None
            sandbox: SandboxInfo = answer
            if (await self.provider.health(sandbox)).ok:
                POOL_CLAIMS.labels(request.template, "hit").inc()
                return sandbox.model_copy(update={"session_id": request.session_id})
            log.warning("pool VM %s is unhealthy: destroyed, claiming another", sandbox.id)
            await self.provider.destroy(sandbox)
        POOL_CLAIMS.labels(request.template, "miss").inc()
        return None

    @activity.defn(name="AssignSandbox")
    async def assign(self, sandbox: SandboxInfo) -> None:
        """Label a claimed machine its session's (idempotent), for reconciliation."""
        await self.provider.assign(sandbox.handle, sandbox.session_id)

    @activity.defn(name="PreserveSandbox")
    async def preserve(self, sandbox: SandboxInfo) -> None:
        """End the machine and keep its disk (a container: its workspace) for a resume."""
        async with heartbeating():
            await self.provider.preserve(sandbox, self.connect_timeout_s)

    @activity.defn(name="RestoreSandbox")
    async def restore(self, request: RestoreRequest) -> SandboxInfo:
        """A new machine with the preserved disk, its guest connected; a failure removes
        the new machine and keeps the disk, for another try."""
        async with heartbeating():
            try:
                return await self.provider.restore(
                    request.preserved.id,
                    request.sandbox_id,
                    request.session_id,
                    request.preserved.template,
                    self.connect_timeout_s,
                )
            except Exception:  # a cancel is the session's end, which destroys it itself
                placeholder = request.preserved.model_copy(
                    update={"id": request.sandbox_id, "handle": ""}
                )
                await asyncio.shield(self.provider.destroy(placeholder))
                raise

    @activity.defn(name="HibernateSandbox")
    async def hibernate(self, sandbox: SandboxInfo) -> None:
        """Suspend the machine with its memory saved (idempotent). Its guest drops its link;
        the session must not run a step until it is woken."""
        async with heartbeating():
            await self.provider.suspend(sandbox.handle)

    @activity.defn(name="WakeSandbox")
    async def wake(self, sandbox: SandboxInfo) -> None:
        """Resume a hibernated machine (idempotent), wait until its guest is back, set its
        clock. A machine that is gone fails it for good: the session replaces it."""
        async with heartbeating():
            try:
                await self.provider.wake(sandbox, self.connect_timeout_s)
            except SandboxDied as exc:
                raise ApplicationError(str(exc), type="SandboxDied", non_retryable=True) from exc
