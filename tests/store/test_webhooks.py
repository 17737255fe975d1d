"""Webhook deliveries come from the event log: written with the events they tell, in the same
transaction, once per event and subscribed endpoint, and saying ids and statuses only."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session, select

from api.schemas import WebhookEventName
from store import events, webhooks
from store.events import EventType, NewEvent
from store.models import SessionRow, User, WebhookDelivery, WebhookEndpoint, utcnow


def test_the_api_offers_exactly_the_events_that_are_told() -> None:
    assert set(WebhookEventName.__args__) == set(webhooks.EVENTS)  # type: ignore[attr-defined]


def test_an_event_is_told_once_to_each_endpoint_that_asked_for_it(engine: Engine) -> None:
    with Session(engine) as db:
        user = User(email=f"{uuid.uuid4().hex}@example.com", password_hash="x")
        other = User(email=f"{uuid.uuid4().hex}@example.com", password_hash="x")
        db.add_all([user, other])
        db.flush()
        row = SessionRow(user_id=user.id)
        db.add(row)
        everything = WebhookEndpoint(user_id=user.id, url="https://a.example/h",
                                     events=list(webhooks.EVENTS), secret="s")  # fmt: skip
        finished = WebhookEndpoint(user_id=user.id, url="https://b.example/h",
                                   events=[webhooks.TASK_FINISHED], secret="s")  # fmt: skip
        paused = WebhookEndpoint(user_id=user.id, url="https://c.example/h", active=False,
                                 events=list(webhooks.EVENTS), secret="s")  # fmt: skip
        strangers = WebhookEndpoint(user_id=other.id, url="https://d.example/h",
                                    events=list(webhooks.EVENTS), secret="s")  # fmt: skip
        db.add_all([everything, finished, paused, strangers])
        db.commit()
        sid = row.id
        ids = {e.id: name for e, name in ((everything, "all"), (finished, "finished"))}
    batch = [
        NewEvent(type=EventType.task_queued, data={"task_id": "t1", "prompt": "a secret plan"},
                 key="q"),
        NewEvent(type=EventType.task_status, data={"task_id": "t1", "status": "running"}, key="r"),
        NewEvent(type=EventType.task_status,
                 data={"task_id": "t1", "status": "succeeded", "result": "private words"},
                 key="s"),
        NewEvent(type=EventType.sandbox_died, data={"sandbox_id": "x1", "error": "oom"}, key="d"),
        NewEvent(type=EventType.session_status, data={"status": "ended"}, key="e"),
    ]  # fmt: skip
    for _ in range(2):  # a retried batch: its events, and so their deliveries, once
        with Session(engine) as db:
            events.append(db, sid, batch)
    with Session(engine) as db:
        found = db.exec(select(WebhookDelivery)).all()
    told = sorted((ids[d.endpoint_id], d.event) for d in found)
    assert told == [
        ("all", "sandbox.died"), ("all", "session.ended"), ("all", "task.finished"),
        ("finished", "task.finished"),
    ]  # fmt: skip
    assert all(d.state == webhooks.PENDING and not d.dispatched for d in found)
    body = json.loads(next(d.body for d in found if d.event == "task.finished"))
    assert body["session_id"] == sid and body["type"] == "task.finished"
    assert body["data"] == {"task_id": "t1", "status": "succeeded"}  # no result, no prompt
    with Session(engine) as db:
        assert len(webhooks.undispatched(db, 10)) == 4
        webhooks.dispatched(db, found[0].id)
        webhooks.attempted(db, found[0].id, 503, "answered 503", 12)
        webhooks.attempted(db, found[0].id, 200, None, 9, webhooks.DELIVERED)
        assert len(webhooks.undispatched(db, 10)) == 3
        logged = db.get(WebhookDelivery, found[0].id)
        assert logged is not None and logged.state == webhooks.DELIVERED
        assert [a["status"] for a in logged.attempts] == [503, 200]


def test_deliveries_that_ended_long_ago_are_forgotten_and_no_other(engine: Engine) -> None:
    now = utcnow()
    with Session(engine) as db:
        user = User(email=f"{uuid.uuid4().hex}@example.com", password_hash="x")
        db.add(user)
        db.flush()
        endpoint = WebhookEndpoint(user_id=user.id, url="https://a.example/h",
                                   events=list(webhooks.EVENTS), secret="s")  # fmt: skip
        db.add(endpoint)
        db.flush()

        def delivery(state: str, finished: datetime | None) -> WebhookDelivery:
            return WebhookDelivery(endpoint_id=endpoint.id, event="task.finished",
                                   session_id="s", body="{}", state=state,
                                   finished_at=finished)  # fmt: skip

        kept = [
            delivery(webhooks.PENDING, None),  # still being tried, however old
            delivery(webhooks.DELIVERED, now - timedelta(days=1)),
            delivery(webhooks.FAILED, now - timedelta(days=6)),
        ]
        gone = [
            delivery(webhooks.DELIVERED, now - timedelta(days=8)),
            delivery(webhooks.FAILED, now - timedelta(days=30)),
        ]
        db.add_all(kept + gone)
        db.commit()
        kept_ids = {d.id for d in kept}
        assert webhooks.prune(db, now - timedelta(days=7)) == 2
    with Session(engine) as db:
        left = set(db.exec(select(WebhookDelivery.id)).all())
    assert left == kept_ids
