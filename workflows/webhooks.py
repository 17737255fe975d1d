"""Webhook deliveries: one small workflow per delivery, started by each worker's dispatcher.

Why not from the session workflow: the events are written by the event log (its keys make
each one once), and the delivery rows with them in one transaction (store/webhooks.py), so
the outbox already says exactly what to tell; starting deliveries from the session workflow
would add commands to every session's history (and a patch to every path that records an
end), and a receiver that is down for hours would hold work in the session's run across its
continue-as-new. A workflow of its own per delivery keeps the retries (Temporal's, with
backoff) apart from the session: it outlives the session's end, and a worker restart loses
nothing. Its id is the delivery's, and an id is never reused, so however many workers see
the row at once, it is delivered by one workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.models import WebhookRequest
    from activities.webhooks import WebhookActivities
    from store import webhooks
    from store.models import utcnow

log = logging.getLogger("berth.webhooks")

# The first retry after 2 s, then doubling up to 10 min apart: with 12 attempts, a receiver
# down for about half an hour still gets it.
RETRY_FIRST = timedelta(seconds=2)
RETRY_MOST_APART = timedelta(minutes=10)
# Deliveries started per pass of a dispatcher.
DISPATCH_BATCH = 100
# How often a dispatcher forgets the deliveries past BERTH_WEBHOOK_KEEP_DAYS.
PRUNE_EVERY = timedelta(hours=1)


def delivery_workflow_id(delivery_id: str) -> str:
    return f"webhook-{delivery_id}"


@workflow.defn(name="WebhookDelivery")
class WebhookDelivery:
    @workflow.run
    async def run(self, request: WebhookRequest) -> bool:
        """Whether it was delivered (each attempt is in the delivery's log either way)."""
        try:
            await workflow.execute_activity_method(
                WebhookActivities.deliver,
                request,
                # The request's own timeout, and room to resolve the name and log the attempt.
                start_to_close_timeout=timedelta(seconds=request.timeout_s + 15),
                retry_policy=RetryPolicy(
                    initial_interval=RETRY_FIRST,
                    backoff_coefficient=2.0,
                    maximum_interval=RETRY_MOST_APART,
                    maximum_attempts=request.max_attempts,
                ),
                summary="deliver a webhook",
            )
        except ActivityError:
            return False
        return True


class Dispatcher:
    """Starts the delivery workflow of every delivery row not started yet, on ``task_queue``
    (this host's: its worker runs the activity)."""

    def __init__(
        self,
        client: Client,
        engine: Engine,
        task_queue: str,
        max_attempts: int,
        timeout_s: float,
        keep_days: float = 7,
    ) -> None:
        self.client, self.engine, self.task_queue = client, engine, task_queue
        self.max_attempts, self.timeout_s = max_attempts, timeout_s
        self.keep = timedelta(days=keep_days)
        self.pruned_at: datetime | None = None

    def _due(self) -> list[str]:
        with Session(self.engine) as db:
            return webhooks.undispatched(db, DISPATCH_BATCH)

    def _started(self, delivery_id: str) -> None:
        with Session(self.engine) as db:
            webhooks.dispatched(db, delivery_id)

    async def dispatch(self) -> int:
        """Start what is due; how many this pass started."""
        started = 0
        for delivery_id in await asyncio.to_thread(self._due):
            request = WebhookRequest(
                delivery_id=delivery_id, max_attempts=self.max_attempts, timeout_s=self.timeout_s
            )
            try:
                await self.client.start_workflow(
                    WebhookDelivery.run,
                    request,
                    id=delivery_workflow_id(delivery_id),
                    task_queue=self.task_queue,
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    static_summary=f"webhook delivery {delivery_id}",
                )
                started += 1
            except WorkflowAlreadyStartedError:
                pass  # another worker's dispatcher started it
            await asyncio.to_thread(self._started, delivery_id)
        return started

    def _prune(self) -> int:
        with Session(self.engine) as db:
            return webhooks.prune(db, utcnow() - self.keep)

    async def prune_now_and_then(self) -> None:
        """Forget the deliveries that ended past ``keep_days`` ago, at most once an hour."""
        now = utcnow()
        if self.pruned_at is not None and now - self.pruned_at < PRUNE_EVERY:
            return
        self.pruned_at = now
        gone = await asyncio.to_thread(self._prune)
        if gone:
            log.info("forgot %d webhook deliveries older than %s", gone, self.keep)

    async def forever(self, every_s: float, stop: asyncio.Event) -> None:
        """Dispatch every ``every_s`` until ``stop`` (and prune the log now and then); a
        failed pass (the database or Temporal down) is logged, and the next one tries
        again."""
        while not stop.is_set():
            try:
                await self.dispatch()
                await self.prune_now_and_then()
            except Exception:
                log.exception("dispatching webhook deliveries failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
