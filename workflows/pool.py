"""SandboxPool: a warm pool of booted, generic VMs for one template on one host.

It keeps ``target`` VMs ready (booted, their guest agent connected), between ``min_size``
and ``max_size`` as the recent claim rate asks. A session claims one with the ``claim``
update (through the ClaimSandbox activity, which also makes the VM the session's); an empty
pool answers None at once and the session creates one cold: never an error, never a wait.
Boots are paced: at most ``max_booting`` at a time, counted from the moment they are asked
for, so a slow or failing boot never leads to more boots than the target (failures back
off). A VM is never given back: a session's end destroys it, and the pool boots a fresh one.
The ``stop`` signal (its worker stopping) destroys every member and ends the pool, within
``stop_timeout_s``: what it could not remove by then is left to reconciliation.

Each member's machine is labelled with a session id of its own (``pool-<template>-<id>``),
which reconciliation asks this workflow about (``owns``).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.models import POOL_CLAIM_UPDATE, PoolClaim, SandboxRequest
    from activities.sandbox import SandboxActivities
    from sandboxes.models import SandboxInfo
    from workflows import options

MEMBER_PREFIX = "pool-"
# Claims within this window set the pool's size.
RATE_WINDOW = timedelta(minutes=5)
RESIZE_EVERY = timedelta(seconds=30)
# Claims answered, remembered per session: a retried claim gets the same VM.
REMEMBERED_CLAIMS = 100
MAX_BACKOFF_S = 300.0
STOP_TIMEOUT_S = 120.0


def member_session_id(template: str, sandbox_id: str) -> str:
    return f"{MEMBER_PREFIX}{template}-{sandbox_id}"


def pool_member(session_id: str) -> tuple[str, str] | None:
    """(template, sandbox id) of a pool member's session id, else None."""
    if not session_id.startswith(MEMBER_PREFIX):
        return None
    template, _, sandbox_id = session_id.removeprefix(MEMBER_PREFIX).rpartition("-")
    return (template, sandbox_id) if template and sandbox_id else None


class PoolState(BaseModel):
    template: str
    target: int
    ready: list[SandboxInfo] = Field(default_factory=list)
    booting: list[str] = Field(default_factory=list)  # sandbox ids asked for, not ready yet
    claim_times: list[datetime] = Field(default_factory=list)
    claimed: dict[str, SandboxInfo] = Field(default_factory=dict)  # by session id
    hits: int = 0
    misses: int = 0
    boot_failures: int = 0  # in a row
    stopping: bool = False  # told to stop: it destroys its members and ends
    # Members its end gave up on (a boot not cancelled, a VM not removed in time).
    abandoned: list[str] = Field(default_factory=list)

    def owns(self, sandbox_id: str) -> bool:
        """Whether the sandbox is this pool's: ready, booting, or just handed out (its new
        owner may not have recorded it yet)."""
        return (
            sandbox_id in self.booting
            or any(s.id == sandbox_id for s in self.ready)
            or any(s.id == sandbox_id for s in self.claimed.values())
        )


class PoolInput(BaseModel):
    template: str
    host_task_queue: str
    min_size: int = Field(ge=0)
    max_size: int = Field(ge=0)
    max_booting: int = Field(default=1, ge=1)
    # How long its end waits for boots in flight, then for the removal of its VMs.
    stop_timeout_s: float = Field(default=STOP_TIMEOUT_S, gt=0)
    carried: PoolState | None = None


@workflow.defn(name="SandboxPool")
class SandboxPool:
    @workflow.init
    def __init__(self, params: PoolInput) -> None:
        self.params = params
        self.s = params.carried or PoolState(template=params.template, target=params.min_size)
        self.changed = False
        self.boots: set[asyncio.Task[None]] = set()
        # The provision activity of each boot in flight, by sandbox id.
        self.provisions: dict[str, workflow.ActivityHandle[SandboxInfo]] = {}

    @workflow.run
    async def run(self, params: PoolInput) -> None:
        while not self.s.stopping:
            self.resize()
            # Once Temporal suggests continuing as new, no boot starts: the ones in flight
            # end, and then the pool moves on (boots that keep failing cannot postpone it).
            suggested = workflow.info().is_continue_as_new_suggested()
            while (
                not suggested
                and len(self.s.ready) + len(self.s.booting) < self.s.target
                and len(self.s.booting) < params.max_booting
            ):
                self.start_boot()
            if suggested and not self.s.booting and workflow.all_handlers_finished():
                workflow.continue_as_new(params.model_copy(update={"carried": self.s}))
            self.changed = False
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self.changed or self.s.stopping, timeout=RESIZE_EVERY
                )
        # Ending (its worker stops): boots in flight are cancelled, not waited for; each
        # provision destroys what it made before its cancel completes. (Before the patch,
        # the pool waited for them.)
        if workflow.patched("pool-stop-cancels-boots"):
            for provision in self.provisions.values():
                provision.cancel()
        if not workflow.patched("pool-stop-bounded"):
            # A run begun before: it waits for every boot and removal, however long.
            await workflow.wait_condition(lambda: not self.s.booting)
            await asyncio.gather(*(self.destroy(sandbox) for sandbox in self.s.ready))
            self.s.ready = []
            return
        await self.end_within(timedelta(seconds=params.stop_timeout_s))

    async def end_within(self, bound: timedelta) -> None:
        """The pool's end, bounded: a boot whose cancel does not complete, or a VM that
        cannot be removed, is given up on (said in the log and the pool's memo, its id in
        its state) rather than keeping the pool stopping forever, and a worker's next start
        without a pool. The host's reconciliation removes those machines later: no pool
        owns them any more."""
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(
                lambda: not self.s.booting, timeout=bound, timeout_summary="boots' end"
            )
        ready, self.s.ready = self.s.ready, []
        ends = await asyncio.gather(
            *(self.destroy(sandbox, options.destroying_pool_vm(bound)) for sandbox in ready),
            return_exceptions=True,
        )
        failed = [s.id for s, ended in zip(ready, ends, strict=True) if ended is not None]
        self.s.abandoned = [*self.s.booting, *failed]
        if self.s.abandoned:
            workflow.logger.warning(
                "the pool ended without removing %s; reconciliation removes them",
                ", ".join(self.s.abandoned),
            )
            workflow.upsert_memo({"abandoned": self.s.abandoned})

    def resize(self) -> None:
        since = workflow.now() - RATE_WINDOW
        self.s.claim_times = [t for t in self.s.claim_times if t > since]
        wanted = max(self.params.min_size, len(self.s.claim_times))
        self.s.target = min(self.params.max_size, wanted)

    def start_boot(self) -> None:
        sandbox_id = workflow.uuid4().hex
        self.s.booting.append(sandbox_id)
        task = asyncio.create_task(self.boot(sandbox_id))
        self.boots.add(task)
        task.add_done_callback(self.boots.discard)

    async def boot(self, sandbox_id: str) -> None:
        request = SandboxRequest(
            session_id=member_session_id(self.params.template, sandbox_id),
            sandbox_id=sandbox_id,
            template=self.params.template,
        )
        provision = workflow.start_activity_method(
            SandboxActivities.provision,
            request,
            task_queue=self.params.host_task_queue,
            summary=f"boot a {self.params.template!r} pool VM",
            **options.BOOT_POOL_VM,
        )
        self.provisions[sandbox_id] = provision
        try:
            sandbox = await provision
        except ActivityError:
            # The activity destroyed its machine. Back off, still counted as booting, so a
            # failing template does not spin; a cancelled one (the pool ending) does not.
            if self.s.stopping and workflow.patched("pool-stop-cancels-boots"):
                return
            self.s.boot_failures += 1
            workflow.logger.warning("a pool VM failed to boot (%d in a row)", self.s.boot_failures)
            backoff = timedelta(seconds=min(MAX_BACKOFF_S, 2.0**self.s.boot_failures))
            # A stop ends the back-off: the pool's end waits for no boot slot (up to 300 s,
            # past the worker's wait for its pools, whose next start then found none).
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: self.s.stopping, timeout=backoff)
        else:
            self.s.boot_failures = 0
            if self.s.stopping:
                await self.destroy(sandbox)
            else:
                self.s.ready.append(sandbox)
        finally:
            self.provisions.pop(sandbox_id, None)
            self.s.booting.remove(sandbox_id)
            self.changed = True

    async def destroy(
        self, sandbox: SandboxInfo, timing: options.ActivityOptions = options.DESTROY_POOL_VM
    ) -> None:
        await workflow.execute_activity_method(
            SandboxActivities.destroy,
            sandbox,
            task_queue=self.params.host_task_queue,
            summary="destroy a pool VM",
            **timing,
        )

    @workflow.update(name=POOL_CLAIM_UPDATE)
    def claim(self, request: PoolClaim) -> SandboxInfo | None:
        """A ready VM for the session (the same one if it asked before), or None at once."""
        known = self.s.claimed.get(request.session_id)
        if known is not None:
            return known
        self.s.claim_times.append(workflow.now())
        self.changed = True
        if not self.s.ready or self.s.stopping:
            self.s.misses += 1
            return None
        sandbox = self.s.ready.pop(0)
        self.s.hits += 1
        self.s.claimed[request.session_id] = sandbox
        while len(self.s.claimed) > REMEMBERED_CLAIMS:
            del self.s.claimed[next(iter(self.s.claimed))]
        return sandbox

    @workflow.signal
    def stop(self) -> None:
        """Destroy every member and end."""
        self.s.stopping = True

    @workflow.query
    def state(self) -> PoolState:
        return self.s
