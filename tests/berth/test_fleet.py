"""What every worker reads of the fleet: the other hosts that read lost (never itself) and
that it has watched silent long enough itself (not across its own failed reads), and
the registry as placement takes it (lost applied, the template's memory, each host's queue)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from sqlmodel import Session

from activities.fleet import fleet
from berth.fleet import Silence
from berth.registry import register
from store import hosts
from store.db import get_engine, migrate
from store.models import HostRow, HostState, utcnow
from tests.berth.test_registry import host_settings, provider


def test_the_other_silent_hosts_read_lost_and_placement_sees_them_so(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'berth.db'}"
    migrate(db_url)
    engine = get_engine(db_url)
    for name in ("h1", "h2", "h3"):
        settings = host_settings(tmp_path, db_url).model_copy(update={"host_id": name})
        asyncio.run(register(settings, engine, provider(), utcnow()))
    with Session(engine) as db:
        for name in ("h1", "h2"):  # silent for a minute
            db.get(HostRow, name).last_seen = utcnow() - timedelta(minutes=1)  # type: ignore[union-attr]
        db.commit()
        hosts.set_state(db, "h3", HostState.draining)
        rows = hosts.listing(db)
        seen = fleet(db, "default", lost_after_s=30)
    silence = Silence()
    assert silence.lost(rows, "h1", 30, clock=100.0) == []  # not watched silent long enough
    assert [row.id for row in silence.lost(rows, "h1", 30, clock=131.0)] == ["h2"]  # never h1
    assert silence.lost(rows, "h1", 3600, clock=131.0) == []
    silence.forget()  # a read failed: what it watched may have been an outage of its own
    assert silence.lost(rows, "h1", 30, clock=140.0) == []
    states = {h.id: (h.state, h.task_queue) for h in seen.hosts}
    assert states == {
        "h1": (HostState.lost, "berth-host-h1"),
        "h2": (HostState.lost, "berth-host-h2"),
        "h3": (HostState.draining, "berth-host-h3"),
    }
    assert seen.memory_mb == 512
