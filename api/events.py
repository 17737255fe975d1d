"""Server-Sent Events from a session's event log.

The stream replays everything after the client's last seen sequence number, then follows
the log a batch of new events at a time: it sleeps until the store's notification says the
session's log grew (see store/notify.py), reads what is new with a short-lived connection,
and ends once the log ends with the session's final event (a resumed session's log goes on
past an earlier one). An idle stream holds no database connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime

from fastapi.responses import Response, StreamingResponse
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.background import BackgroundTask

from api import service
from api.deps import Problem, Streams
from store import events
from store.events import EventType
from store.models import Event, User
from store.notify import Hub
from telemetry.metrics import STREAM_DELAY

KEEPALIVE_S = 15.0
READ_BATCH = 500


def sse(event: Event, data: str, name: str | None = None) -> str:
    """One SSE message; without ``name`` it is a plain ``message`` event."""
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    kind = f"event: {name}\n" if name else ""
    return f"id: {event.seq}\n{kind}{lines}\n"


def as_json(event: Event) -> str:
    return sse(event, json.dumps(events.as_json(event)), name=event.type)


# Renders a batch of new events as SSE messages.
Render = Callable[[Sequence[Event]], str]


def each(render: Callable[[Event], str]) -> Render:
    """A batch as one message per event."""
    return lambda batch: "".join(render(event) for event in batch)


JSON_MESSAGES = each(as_json)


async def follow(
    engine: Engine,
    hub: Hub,
    session_id: str,
    after: int,
    render: Render,
    lifetime_s: float,
    pace_s: float = 0.0,
) -> AsyncIterator[str]:
    """The log after ``after``, rendered a batch (all that is new) at a time; at least
    ``pace_s`` between batches, so a fast writer's events are coalesced, not sent one each.
    After ``lifetime_s`` it ends, and the client reconnects with its Last-Event-ID."""
    deadline = asyncio.get_running_loop().time() + lifetime_s

    def read(after: int) -> list[Event]:
        with Session(engine) as db:
            return events.read_after(db, session_id, after, READ_BATCH)

    ended = False
    live = False  # past the first read: what comes now was written while the client watched
    with hub.watch(session_id) as bell:
        yield "retry: 2000\n\n"
        while True:
            bell.clear()  # before the read, so a write during it wakes the next wait
            batch = await asyncio.to_thread(read, after)
            if batch:
                yield render(batch)
                if live:
                    measure_delay(batch)
                after = batch[-1].seq
                # Only the log's last event ends the stream: a resumed session's log goes
                # on past the end of its earlier run.
                ended = events.is_final(batch[-1])
            if len(batch) == READ_BATCH:
                continue
            live = True
            if ended:
                return
            if batch and pace_s:
                await asyncio.sleep(pace_s)
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(bell.wait(), min(KEEPALIVE_S, left))
            except TimeoutError:
                # Also a read: a wake-up lost with a dropped notification costs no event.
                yield ": keepalive\n\n"


def measure_delay(batch: Sequence[Event]) -> None:
    """How long each output line took from its write to its way out to the client."""
    now = datetime.now(UTC)
    for event in batch:
        if event.type == EventType.step_output:
            written = event.created_at
            if written.tzinfo is None:  # SQLite gives back naive UTC
                written = written.replace(tzinfo=UTC)
            STREAM_DELAY.observe(max(0.0, (now - written).total_seconds()))


async def counted(give_back: Callable[[], None], body: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        give_back()


def stream(
    db: Session,
    engine: Engine,
    hub: Hub,
    count: Streams,
    viewer: User,
    session_id: str,
    after: int,
    render: Render = JSON_MESSAGES,
    pace_s: float = 0.0,
) -> Response:
    """The response to ``viewer``'s request for a session's events after ``after`` (a 404
    unless the viewer may read the session); the stream counts against the viewer's streams
    (an admin's watching is not the owner's). The JSON API and the dashboard differ only in
    ``render`` and ``pace_s``."""
    row = service.visible_session(db, viewer, session_id)
    if after > row.last_seq:
        raise Problem(400, f"event {after} is beyond this session's last, {row.last_seq}")
    finished = row.ended_at is not None and after == row.last_seq
    # The request's connection goes back to the pool now, not when the stream ends.
    db.close()
    if finished:
        # Nothing will follow; 204 tells an EventSource to stop reconnecting.
        return Response(status_code=204)
    give_back = count.take(viewer.id)
    body = follow(engine, hub, row.id, after, render, count.lifetime_s, pace_s)
    return StreamingResponse(
        counted(give_back, body),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # Also when the body never started (the client left at once).
        background=BackgroundTask(give_back),
    )
