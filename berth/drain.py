"""``python -m berth host drain HOST`` and ``host undrain HOST``: an operator's state for a
sandbox host in the registry. A draining host takes no new sessions and ends its warm pools
(its worker acts on its next heartbeat); its live sessions run on until they end. Undrained,
it is active again. With ``--move`` each live session on the host is asked to move off it
between its tasks, its disk kept in BERTH_KEPT_DISKS_DIR and restored on another host
(workflows/session.py: move_off)."""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy import Engine
from sqlmodel import Session
from temporalio.service import RPCError, RPCStatusCode

from config.settings import Settings, get_settings
from store import audit, hosts
from store.db import get_engine, migrate
from store.models import HostState
from store.usage import placed_sandboxes
from workflows.client import connect, workflow_id
from workflows.session import SessionWorkflow


def set_host_state(host_id: str, state: HostState, move: bool = False) -> int:
    settings = get_settings()
    migrate(settings.db_url)
    engine = get_engine(settings.db_url)
    with Session(engine) as db:
        if not hosts.set_state(db, host_id, state):
            known = ", ".join(row.id for row in hosts.listing(db)) or "none yet"
            sys.exit(f"no host {host_id!r} in the registry (known: {known})")
        action = "host.drain" if state == HostState.draining else "host.undrain"
        audit.record(db, None, action, host_id)
    print(f"host {host_id} is {state}")
    if move:
        moving = asyncio.run(move_sessions(settings, engine, host_id))
        print(f"{moving} sessions asked to move off {host_id}, their disks kept")
    return 0


async def move_sessions(settings: Settings, engine: Engine, host_id: str) -> int:
    """Ask each live session with a machine on the host to move off it; how many were."""
    client = await connect(settings)
    asked = 0
    for sandbox in await asyncio.to_thread(placed_sandboxes, engine, host_id):
        handle = client.get_workflow_handle(workflow_id(sandbox.session_id))
        try:
            await handle.signal(SessionWorkflow.move_off_host, host_id)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            continue  # ended meanwhile
        asked += 1
    return asked
