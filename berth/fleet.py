"""What every worker does for the fleet, beside its own host's work: it answers the fleet's
queue (the registry read a session placed anew needs), and when another host reads as lost
(silent past BERTH_HOST_LOST_AFTER_S) it takes that host's sessions on.

Taking them on is two things. The lost host's task queue gets a worker of this process's for
workflow tasks and local activities only (``no_remote_activities``): a session's workflow
runs on its host's queue, so that each step's activity is dispatched eagerly to the same
worker (25 ms a step against 76 ms across two queues), and with its host gone nothing else
would poll it. And each session with a machine on that host is told, every beat while the
host reads lost (the session ignores a repeat), that its machine is lost with the host: it
then moves itself (workflows/session.py: move), to a machine on a host placed anew and, by
continue-as-new, to that host's queue, after which it needs nothing of the lost host.

A host is taken for lost only once this worker has watched its heartbeat stand still for
the bound itself (Silence), so a database outage, after which every host's last beat is
old, moves no session. Every surviving worker does the same: Temporal hands each workflow
task to one poller, and a session takes the first word of its loss, so no election is
needed and any one survivor is enough. A host that comes back polls its own queue again;
the survivors let go of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from config.settings import Settings
from store import hosts
from store.models import HostRow, HostState, utcnow
from store.usage import placed_sandboxes
from workflows.client import workflow_id
from workflows.models import SandboxDeath
from workflows.pool import SandboxPool
from workflows.session import SessionWorkflow

log = logging.getLogger("berth.fleet")


class Silence:
    """How long this worker has itself watched each other host's heartbeat stand still. A
    host is taken for lost only once it reads lost and this worker has watched it silent for
    BERTH_HOST_LOST_AFTER_S over reads that all succeeded: after a database outage every
    host's last beat is old, and none must look lost for that (a failed read forgets all)."""

    def __init__(self) -> None:
        self.watched: dict[str, tuple[datetime, float]] = {}

    def lost(
        self, rows: Sequence[HostRow], own: str, lost_after_s: float, clock: float
    ) -> list[HostRow]:
        """The other hosts lost as of ``clock`` (a monotonic time, in seconds)."""
        now, watched, found = utcnow(), {}, []
        for row in rows:
            if row.id == own:
                continue
            before = self.watched.get(row.id)
            since = before[1] if before is not None and before[0] == row.last_seen else clock
            watched[row.id] = (row.last_seen, since)
            silent = clock - since >= lost_after_s
            if silent and hosts.seen_state(row, lost_after_s, now) == HostState.lost:
                found.append(row)
        self.watched = watched
        return found

    def forget(self) -> None:
        self.watched = {}


def _rows(engine: Engine) -> list[HostRow]:
    with Session(engine) as db:
        return hosts.listing(db)


class Rescue:
    """This worker's share of the lost hosts' sessions (see the module's doc)."""

    def __init__(
        self,
        client: Client,
        engine: Engine,
        settings: Settings,
        local_activities: Sequence[Any],
        executor: Executor,
    ) -> None:
        self.client = client
        self.engine = engine
        self.settings = settings
        self.local_activities = list(local_activities)
        self.executor = executor
        self.adopted: dict[str, tuple[Worker, asyncio.Task[None]]] = {}
        self.silence = Silence()

    async def forever(self, stop: asyncio.Event) -> None:
        """Each BERTH_HOST_HEARTBEAT_S until ``stop``: adopt the queues of lost hosts, let go
        of those back, and tell the lost hosts' sessions."""
        try:
            while not stop.is_set():
                try:
                    await self.once()
                except Exception:
                    self.silence.forget()
                    log.exception("lost hosts not looked after; again next beat")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.host_heartbeat_s)
        finally:
            for queue in list(self.adopted):
                await self.let_go(queue)

    async def once(self) -> None:
        settings = self.settings
        rows = await asyncio.to_thread(_rows, self.engine)
        lost = self.silence.lost(
            rows, settings.host_id, settings.host_lost_after_s, time.monotonic()
        )
        for queue in set(self.adopted) - {row.task_queue for row in lost}:
            await self.let_go(queue)
        for row in lost:
            if row.task_queue not in self.adopted:
                self.adopt(row.task_queue)
            await self.tell_sessions(row.id)

    def adopt(self, queue: str) -> None:
        log.warning("taking on the workflows of lost host queue %s", queue)
        worker = Worker(
            self.client,
            task_queue=queue,
            workflows=[SessionWorkflow, SandboxPool],
            activities=self.local_activities,
            activity_executor=self.executor,
            # Its sandboxes' activities stay for its own worker, should it come back.
            no_remote_activities=True,
        )
        self.adopted[queue] = (worker, asyncio.create_task(worker.run()))

    async def let_go(self, queue: str) -> None:
        worker, running = self.adopted.pop(queue)
        log.info("letting go of host queue %s", queue)
        await worker.shutdown()
        with contextlib.suppress(Exception):
            await running

    async def tell_sessions(self, host_id: str) -> None:
        """Each live session with a machine on the lost host: its machine is lost with it."""
        lost_after = self.settings.host_lost_after_s
        for sandbox in await asyncio.to_thread(placed_sandboxes, self.engine, host_id):
            death = SandboxDeath(
                sandbox_id=sandbox.id,
                detail=f"its host {host_id} is lost (no heartbeat for {lost_after:.0f} s)",
                host_lost=host_id,
            )
            handle = self.client.get_workflow_handle(workflow_id(sandbox.session_id))
            try:
                await handle.signal(SessionWorkflow.sandbox_died, death)
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
