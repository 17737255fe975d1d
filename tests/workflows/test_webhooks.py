"""The webhook delivery workflow: a failed attempt is tried again with a growing backoff up to
the attempts allowed; it says whether the delivery got through. Its retried path is recorded
for the replay test (BERTH_RECORD_HISTORY=1)."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.models import WebhookRequest
from tests.workflows.test_session import time_skipping
from workflows.webhooks import WebhookDelivery

HISTORIES = Path(__file__).parent / "histories" / "v6"


class Receiver:
    """The delivery activity's stand-in: fails ``failures`` times, then delivers."""

    def __init__(self, failures: int) -> None:
        self.failures, self.attempts = failures, list[int]()

    @activity.defn(name="DeliverWebhook")
    async def deliver(self, request: WebhookRequest) -> None:
        self.attempts.append(activity.info().attempt)
        if len(self.attempts) <= self.failures:
            raise ApplicationError("answered 503", type="WebhookNotDelivered")


async def deliver(
    failures: int, max_attempts: int, record: str | None = None
) -> tuple[bool, Receiver]:
    receiver = Receiver(failures)
    async with (
        await time_skipping() as env,
        Worker(
            env.client,
            task_queue="hooks",
            workflows=[WebhookDelivery],
            activities=[receiver.deliver],
        ),
    ):
        handle = await env.client.start_workflow(
            WebhookDelivery.run,
            WebhookRequest(delivery_id=uuid.uuid4().hex, max_attempts=max_attempts, timeout_s=5),
            id=f"webhook-{uuid.uuid4().hex}",
            task_queue="hooks",
        )
        delivered = await handle.result()
        if record and os.environ.get("BERTH_RECORD_HISTORY"):
            path = HISTORIES / f"{record}.json"
            if path.exists():
                raise FileExistsError(f"{path} is recorded already")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text((await handle.fetch_history()).to_json())
        events = [e async for e in handle.fetch_history_events()]
        # One activity, retried by the server: the history does not grow with the attempts.
        scheduled = [e for e in events if e.HasField("activity_task_scheduled_event_attributes")]
        assert len(scheduled) == 1
        policy = scheduled[0].activity_task_scheduled_event_attributes.retry_policy
        assert policy.initial_interval.ToTimedelta() == timedelta(seconds=2)
        assert policy.backoff_coefficient == 2.0
        assert policy.maximum_attempts == max_attempts
    return delivered, receiver


async def test_a_failed_delivery_is_tried_again_until_it_gets_through() -> None:
    delivered, receiver = await deliver(failures=2, max_attempts=5, record="webhook-retried")
    assert delivered and receiver.attempts == [1, 2, 3]


async def test_a_delivery_stops_after_its_attempts() -> None:
    delivered, receiver = await deliver(failures=10, max_attempts=3)
    assert not delivered and receiver.attempts == [1, 2, 3]
