"""Recording progress: one event appended to the session's log and projected onto its rows."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session
from temporalio import activity

from store import events
from workflows.models import ProgressEvent


class ProgressActivities:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @activity.defn(name="RecordProgress")
    def record(self, event: ProgressEvent) -> int | None:
        """Returns the event's sequence number, or None if a retry had recorded it already."""
        with Session(self.engine) as db:
            recorded = events.record(db, event.session_id, event.type, event.data, event.key)
        return recorded.seq if recorded else None
