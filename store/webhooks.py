"""Webhooks' rows: a user's endpoints, and the deliveries of their sessions' events.

The event log feeds them. When an event that an integrator is told of is appended
(store/events.py:append), a delivery row per subscribed endpoint is written in the same
transaction: the outbox. So an event is never told twice (an event with a key is appended
once, whatever retried) and never lost (no event without its deliveries, nor the reverse).
The worker starts a delivery workflow for each row (workflows/webhooks.py), whose activity
signs and sends it and logs each attempt here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, delete, select, update

from store.models import (
    Event,
    SessionRow,
    SessionStatus,
    TaskStatus,
    WebhookDelivery,
    WebhookEndpoint,
    new_id,
    utcnow,
)

SESSION_READY = "session.ready"
SESSION_ENDED = "session.ended"
TASK_FINISHED = "task.finished"
SANDBOX_DIED = "sandbox.died"
EVENTS = (SESSION_READY, SESSION_ENDED, TASK_FINISHED, SANDBOX_DIED)
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# Of an event's data, what a delivery tells (ids, statuses, the reason of an end): never
# the prompt, a plan or output.
TOLD = ("task_id", "sandbox_id", "status", "error", "template")
# The attempts kept in a delivery's log (a receiver down for a day is tried a few dozen
# times at most: see workflows/webhooks.py).
MAX_LOGGED_ATTEMPTS = 50


def told(event: Event) -> str | None:
    """The webhook event an event of the log is, if any."""
    status = event.data.get("status")
    if event.type == "sandbox.ready":
        return SESSION_READY
    if event.type == "sandbox.died":
        return SANDBOX_DIED
    if event.type == "session.status" and status in (SessionStatus.ended, SessionStatus.failed):
        return SESSION_ENDED
    finished = (TaskStatus.succeeded, TaskStatus.failed, TaskStatus.cancelled)
    if event.type == "task.status" and status in finished:
        return TASK_FINISHED
    return None


def enqueue(db: Session, session_id: str, appended: Sequence[Event]) -> None:
    """Deliveries of ``appended`` to the session's user's endpoints, added to ``db``'s
    transaction (the caller commits)."""
    named = [(event, name) for event in appended if (name := told(event)) is not None]
    if not named:
        return
    session = db.get(SessionRow, session_id)
    if session is None:
        return
    endpoints = db.exec(
        select(WebhookEndpoint).where(
            WebhookEndpoint.user_id == session.user_id, col(WebhookEndpoint.active)
        )
    ).all()
    for event, name in named:
        for endpoint in endpoints:
            if name not in endpoint.events:
                continue
            delivery_id = new_id()
            db.add(
                WebhookDelivery(
                    id=delivery_id,
                    endpoint_id=endpoint.id,
                    event=name,
                    session_id=session_id,
                    body=body(delivery_id, name, event),
                )
            )


def body(delivery_id: str, name: str, event: Event) -> str:
    """The JSON a delivery sends: which event, of which session, when, and its ids and
    statuses."""
    data = {k: event.data[k] for k in TOLD if event.data.get(k) is not None}
    return json.dumps(
        {
            "id": delivery_id,
            "type": name,
            "created_at": _iso(event.created_at),
            "session_id": event.session_id,
            "data": data,
        },
        separators=(",", ":"),
    )


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds")


def undispatched(db: Session, limit: int) -> list[str]:
    """Pending deliveries whose workflow has not been started, oldest first."""
    return list(
        db.exec(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.state == PENDING, col(WebhookDelivery.dispatched).is_(False))
            .order_by(col(WebhookDelivery.created_at))
            .limit(limit)
        )
    )


def dispatched(db: Session, delivery_id: str) -> None:
    db.exec(
        update(WebhookDelivery)
        .where(col(WebhookDelivery.id) == delivery_id)
        .values(dispatched=True)
    )
    db.commit()


def attempted(
    db: Session,
    delivery_id: str,
    status: int | None,
    error: str | None,
    ms: int,
    state: str = PENDING,
) -> None:
    """Log one attempt; ``state`` is the delivery's after it (delivered, failed, or still
    pending: to be tried again)."""
    delivery = db.get(WebhookDelivery, delivery_id)
    if delivery is None:
        return
    entry: dict[str, Any] = {"at": _iso(utcnow()), "status": status, "error": error, "ms": ms}
    delivery.attempts = [*delivery.attempts, entry][-MAX_LOGGED_ATTEMPTS:]
    delivery.state = state
    if state != PENDING:
        delivery.finished_at = utcnow()
    db.add(delivery)
    db.commit()


def prune(db: Session, before: datetime) -> int:
    """Forget the deliveries that ended (delivered or failed) before ``before``, each with
    its body and log: the table would otherwise grow with every event told. How many went."""
    gone = db.exec(
        delete(WebhookDelivery).where(
            col(WebhookDelivery.state) != PENDING,
            col(WebhookDelivery.finished_at) < before,
        )
    )
    db.commit()
    return int(gone.rowcount or 0)


def endpoints_of(db: Session, user_id: str) -> list[WebhookEndpoint]:
    return list(
        db.exec(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.user_id == user_id)
            .order_by(col(WebhookEndpoint.created_at))
        )
    )


def deliveries_of(db: Session, endpoint_id: str, limit: int) -> list[WebhookDelivery]:
    """An endpoint's delivery log, newest first."""
    return list(
        db.exec(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .order_by(col(WebhookDelivery.created_at).desc())
            .limit(limit)
        )
    )


def remove(db: Session, endpoint: WebhookEndpoint) -> None:
    """An endpoint and its log (a delivery in flight finds it gone and stops)."""
    for delivery in db.exec(
        select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    ):
        db.delete(delivery)
    db.delete(endpoint)
    db.commit()
