"""Server-Sent Events from a session's event log.

The stream replays everything after the client's last seen sequence number, then follows
the log. Following is by polling the table, which works unchanged with any number of API
replicas and both databases.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from sqlalchemy import Engine
from sqlmodel import Session

from store import events
from store.models import Event

POLL_S = 0.2
KEEPALIVE_S = 15.0


def sse(event: Event, data: str, name: str | None = None) -> str:
    """One SSE message; without ``name`` it is a plain ``message`` event."""
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    kind = f"event: {name}\n" if name else ""
    return f"id: {event.seq}\n{kind}{lines}\n"


def as_json(event: Event) -> str:
    return sse(event, json.dumps(events.as_json(event)), name=event.type)


async def follow(
    engine: Engine, session_id: str, after: int, render: Callable[[Event], str] = as_json
) -> AsyncIterator[str]:
    def read(after: int) -> list[Event]:
        with Session(engine) as db:
            return events.read_after(db, session_id, after)

    idle = 0.0
    yield "retry: 2000\n\n"
    while True:
        batch = await asyncio.to_thread(read, after)
        for event in batch:
            yield render(event)
            after = event.seq
        if batch:
            idle = 0.0
            continue
        await asyncio.sleep(POLL_S)
        idle += POLL_S
        if idle >= KEEPALIVE_S:
            idle = 0.0
            yield ": keepalive\n\n"
