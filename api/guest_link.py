"""How the API reaches a session's guest for a person's operation (files, services): a
channel (guest_agent/protocol.py) through the relay of the worker that holds the guest's
link (sandboxes/relay.py).

The guest's refusals come back with their reason, as a problem document: ``refused`` (a path
outside the workspace, one the step user may not touch) is a 403, ``missing`` a 404, any
other failure a 409; a session without a running machine is a 409 too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from api.deps import Problem
from config.keys import relay_token
from config.settings import Settings
from store.models import SandboxRow, SessionRow

STATUSES = {"refused": 403, "missing": 404, "failed": 409, "unavailable": 409}


@dataclass
class Link:
    """One operation's channel to the guest, through the relay."""

    ws: ClientConnection

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def end(self) -> None:
        await self.ws.send("end")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The guest's bytes, until its close: a Problem if the operation failed."""
        while True:
            try:
                message = await self.ws.recv()
            except ConnectionClosed:
                raise Problem(409, "the session's machine went away mid-way") from None
            if isinstance(message, bytes):
                yield message
                continue
            ending = json.loads(message)
            if ending.get("error"):
                raise _problem(str(ending["error"]))
            return

    async def result(self) -> dict[str, Any]:
        """The operation's result, once the guest closes its channel (data dropped)."""
        while True:
            try:
                message = await self.ws.recv()
            except ConnectionClosed:
                raise Problem(409, "the session's machine went away mid-way") from None
            if isinstance(message, str):
                ending = json.loads(message)
                if ending.get("error"):
                    raise _problem(str(ending["error"]))
                return dict(ending.get("result") or {})


def _problem(error: str) -> Problem:
    kind, _, reason = error.partition(": ")
    return Problem(STATUSES.get(kind, 409), reason or error)


def running_sandbox(db: Session, row: SessionRow) -> str:
    """The id of the session's running machine; a 409 if it has none now."""
    found = db.exec(
        select(SandboxRow.id)
        .where(SandboxRow.session_id == row.id, SandboxRow.status == "running")
        .order_by(col(SandboxRow.created_at).desc())
    ).first()
    if found is None:
        raise Problem(409, f"session {row.id} has no running machine now")
    return found


@asynccontextmanager
async def guest_channel(
    settings: Settings, sandbox_id: str, kind: str, args: dict[str, Any]
) -> AsyncIterator[Link]:
    """A channel open to the sandbox's guest for an operation of ``kind``."""
    host = settings.relay_host if settings.relay_host not in ("", "0.0.0.0") else "127.0.0.1"
    try:
        async with connect(
            f"ws://{host}:{settings.relay_port}/relay",
            additional_headers={"Authorization": f"Bearer {relay_token(settings)}"},
            max_size=None,
            open_timeout=10,
            compression=None,  # to the relay on loopback: see sandboxes/relay.py
        ) as ws:
            await ws.send(json.dumps({"sandbox_id": sandbox_id, "kind": kind, "args": args}))
            yield Link(ws)
    except (OSError, InvalidStatus) as exc:
        raise Problem(503, f"the session's host cannot be reached: {exc}") from None
