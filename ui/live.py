"""The session page's live updates: Server-Sent Events of HTML fragments, swapped in out of
band by htmx. The stream itself (replay, then follow the log) is api/events.py's, the same
as the JSON API's; this module renders a batch of events as one message.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Annotated, Any

from fastapi import Header, Query
from fastapi.responses import Response
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from api.deps import DbDep, EngineDep, HubDep, StreamsDep
from api.events import sse, stream
from store.events import EventType, is_final
from store.models import Event, StepRow, TaskRow
from ui import state
from ui.render import PageUser, dashboard_router, templates

# Live updates go out at most this often: a fast command's output arrives as one swap.
FRAME_S = 0.1

router = dashboard_router()


@router.get("/ui/sessions/{sid}/events")
def session_events(
    sid: str,
    db: DbDep,
    engine: EngineDep,
    hub: HubDep,
    streams: StreamsDep,
    user: PageUser,
    after: Annotated[int, Query(ge=0)] = 0,
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
) -> Response:
    """The session page's live updates after event ``after`` (the page's own), or after the
    browser's Last-Event-ID when it reconnects: each batch of new events is one message of
    out-of-band swaps, at most one per ``FRAME_S``, so fast output costs few DOM updates."""
    return stream(
        db,
        engine,
        hub,
        streams,
        user,
        sid,
        max(after, last_event_id or 0),
        partial(render_batch, engine),
        pace_s=FRAME_S,
    )


def render_batch(engine: Engine, batch: Sequence[Event]) -> str:
    """New events as one SSE message (and, after the session's last, an ``end`` one that
    closes the page's stream)."""
    fragments = templates.get_template("events.html").module
    parts = []
    for event in coalesce(batch):
        context: dict[str, Any] = {"e": event, "d": event.data}
        # A plan, and a task's end, redraw the task from its rows.
        if event.type in (EventType.task_plan, EventType.task_status):
            context["view"] = _task_view(engine, event.data["task_id"])
        # The macro named as the type's member (events.html has one for every member): a
        # type the enumeration does not know raises here rather than drawing a fallback.
        macro: Any = getattr(fragments, EventType(event.type).name)
        parts.append(str(macro(**context)).strip())
    last = batch[-1]
    message = sse(last, "\n".join(parts))
    return message + (sse(last, "", name="end") if is_final(last) else "")


def coalesce(batch: Sequence[Event]) -> list[Event]:
    """Runs of one step's output on one stream as one event (the last one's number)."""
    out: list[Event] = []
    for event in batch:
        prev = out[-1] if out else None
        if (
            prev is not None
            and event.type == prev.type == EventType.step_output
            and all(event.data[k] == prev.data[k] for k in ("task_id", "index", "stream"))
        ):
            text = prev.data["text"] + event.data["text"]
            data = {**event.data, "text": text}
            out[-1] = Event(session_id=event.session_id, seq=event.seq, type=event.type, data=data)
        else:
            out.append(event)
    return out


def _task_view(engine: Engine, task_id: str) -> state.TaskView | None:
    with Session(engine) as db:
        task = db.get(TaskRow, task_id)
        if task is None:
            return None
        query = select(StepRow).where(StepRow.task_id == task_id).order_by(col(StepRow.index))
        return state.TaskView(task, list(db.exec(query)))
