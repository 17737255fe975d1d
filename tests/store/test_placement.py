"""Which sandboxes the database places on a host, for its watch: the running sandboxes of
live sessions on that host, on SQLite and on PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session

from store import events
from store.events import EventType
from store.usage import placed_sandboxes
from tests.store.test_events import new_session


def ready(engine: Engine, sid: str, sandbox_id: str, host_id: str = "here") -> None:
    data = {"sandbox_id": sandbox_id, "provider": "docker", "host_id": host_id,
            "template": "default", "handle": f"handle-{sandbox_id}"}  # fmt: skip
    with Session(engine) as db:
        events.record(db, sid, EventType.sandbox_ready, data)


def test_the_running_sandboxes_of_live_sessions_on_the_host_are_placed(engine: Engine) -> None:
    live, ended, elsewhere = new_session(engine), new_session(engine), new_session(engine)
    ready(engine, live, "dead-one")
    with Session(engine) as db:
        events.record(db, live, EventType.sandbox_destroyed, {"sandbox_id": "dead-one"})
    ready(engine, live, "current")
    ready(engine, ended, "of-an-ended-session")
    with Session(engine) as db:
        events.record(db, ended, EventType.session_status, {"status": "ended"})
    ready(engine, elsewhere, "on-another-host", host_id="there")
    rows = placed_sandboxes(engine, "here")
    assert [(r.id, r.session_id, r.handle) for r in rows] == [("current", live, "handle-current")]
