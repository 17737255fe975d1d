"""The sweeper on a real Temporal dev server: a row whose workflow was terminated, or is
gone, is closed with the reason through the event log, once, and its user's slot is freed; a
row whose workflow runs, or that was written a moment ago, is left alone."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from sqlalchemy import Engine
from sqlmodel import Session, col, func, select
from temporalio.client import Client

from store.events import EventType
from store.models import Event, SessionRow, SessionStatus, User, utcnow
from workflows.client import workflow_id
from workflows.sweeper import Sweeper


def live_count(engine: Engine, user_id: str) -> int:
    with Session(engine) as db:
        return db.exec(
            select(func.count())
            .select_from(SessionRow)
            .where(SessionRow.user_id == user_id, col(SessionRow.ended_at).is_(None))
        ).one()


def rows(engine: Engine, count: int) -> tuple[str, list[str]]:
    """A user with ``count`` live session rows, last touched a while ago."""
    with Session(engine) as db:
        user = User(email=f"{uuid.uuid4().hex[:8]}@example.com", password_hash="x")
        db.add(user)
        db.commit()
        then = utcnow() - timedelta(minutes=5)
        made = [
            SessionRow(user_id=user.id, status=SessionStatus.ready, updated_at=then)
            for _ in range(count)
        ]
        db.add_all(made)
        db.commit()
        return user.id, [row.id for row in made]


def test_rows_of_closed_or_lost_workflows_are_closed_once(
    engine: Engine, temporal_address: str
) -> None:
    user_id, (terminated, running, lost) = rows(engine, 3)

    async def scenario() -> None:
        client = await Client.connect(temporal_address)
        queue = f"nobody-{uuid.uuid4().hex[:8]}"  # no worker: the workflows just wait
        for sid in (terminated, running):
            await client.start_workflow("SessionWorkflow", id=workflow_id(sid), task_queue=queue)
        await client.get_workflow_handle(workflow_id(terminated)).terminate(reason="operator")
        sweeper = Sweeper(client, engine, batch=2, grace_s=60.0)
        # Bounded: two rows a pass, going round until every live row has been seen.
        first, second = await sweeper.sweep(), await sweeper.sweep()
        assert first.checked == 2 and second.checked == 1
        assert sorted(first.closed + second.closed) == sorted([terminated, lost])
        again = [await sweeper.sweep() for _ in range(2)]
        assert [report.closed for report in again] == [[], []]

    assert live_count(engine, user_id) == 3
    asyncio.run(scenario())
    assert live_count(engine, user_id) == 1
    with Session(engine) as db:
        for sid, reason in ((terminated, "terminated"), (lost, "not found")):
            row = db.get(SessionRow, sid)
            assert row is not None and row.status == SessionStatus.failed
            assert row.ended_at is not None and row.error and reason in row.error
            closing = db.exec(
                select(Event).where(Event.session_id == sid, Event.type == EventType.session_status)
            ).all()
            assert [event.data["status"] for event in closing] == ["failed"]
        kept = db.get(SessionRow, running)
        assert kept is not None and kept.status == SessionStatus.ready


def test_a_row_written_a_moment_ago_is_left_for_its_workflow_to_start(
    engine: Engine, temporal_address: str
) -> None:
    with Session(engine) as db:
        user = User(email="new@example.com", password_hash="x")
        db.add(user)
        db.commit()
        db.add(SessionRow(user_id=user.id))
        db.commit()
        user_id = user.id

    async def sweep() -> None:
        client = await Client.connect(temporal_address)
        report = await Sweeper(client, engine, batch=10, grace_s=60.0).sweep()
        assert report.checked == 0

    asyncio.run(sweep())
    assert live_count(engine, user_id) == 1
