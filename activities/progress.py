"""Recording progress: the workflow's events appended to the session's log and projected
onto its rows. Run as a local activity, in the workflow's own worker: a batch of events
costs one marker in the history and no round trip through the server."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session
from temporalio import activity

from activities.models import ProgressBatch
from store import events


class ProgressActivities:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @activity.defn(name="RecordProgress")
    def record(self, batch: ProgressBatch) -> list[int]:
        """The new events' sequence numbers (none for those a retry had recorded already)."""
        with Session(self.engine) as db:
            return [event.seq for event in events.append(db, batch.session_id, batch.events)]
