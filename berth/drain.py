"""``python -m berth host drain HOST`` and ``host undrain HOST``: an operator's state for a
sandbox host in the registry. A draining host takes no new sessions and ends its warm pools
(its worker acts on its next heartbeat); its live sessions run on until they end. Undrained,
it is active again."""

from __future__ import annotations

import sys

from sqlmodel import Session

from config.settings import get_settings
from store import audit, hosts
from store.db import get_engine, migrate
from store.models import HostState


def set_host_state(host_id: str, state: HostState) -> int:
    settings = get_settings()
    migrate(settings.db_url)
    with Session(get_engine(settings.db_url)) as db:
        if not hosts.set_state(db, host_id, state):
            known = ", ".join(row.id for row in hosts.listing(db)) or "none yet"
            sys.exit(f"no host {host_id!r} in the registry (known: {known})")
        action = "host.drain" if state == HostState.draining else "host.undrain"
        audit.record(db, None, action, host_id)
    print(f"host {host_id} is {state}")
    return 0
