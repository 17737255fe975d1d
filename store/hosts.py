"""The host registry: each sandbox host's row, written by its own heartbeat, and the state
an operator gives it. A host is ``lost`` when its last heartbeat is older than the caller's
bound: nothing marks it so, it only reads so, so a host that comes back is back at once."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from store.models import HostRow, HostState, utcnow

TABLE = HostRow.__table__  # type: ignore[attr-defined]


class HostReport(BaseModel):
    """What a host says of itself on each heartbeat."""

    id: str
    task_queue: str
    provider: str
    accel: str
    vcpus: int
    memory_mb: int
    memory_available_mb: int
    load1: float
    machines: int
    max_machines: int | None
    warm: dict[str, int]
    templates: list[str]
    started_at: datetime


def beat(db: Session, report: HostReport) -> HostState:
    """Write the host's report as of now (a new host comes in active; a known one keeps the
    state an operator gave it), and return that state, which the host acts on."""
    values = {**report.model_dump(), "last_seen": utcnow()}
    insert = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(TABLE)
        .values(**values, state=HostState.active.value)
        .on_conflict_do_update(index_elements=[TABLE.c.id], set_=values)
        .returning(TABLE.c.state)
    )
    state = HostState(db.execute(statement).scalar_one())
    db.commit()
    return state


def set_state(db: Session, host_id: str, state: HostState) -> bool:
    """An operator's state for a host (active or draining); False if no such host."""
    if state == HostState.lost:
        raise ValueError("lost is read from a host's silence, not set")
    done = db.execute(update(TABLE).where(TABLE.c.id == host_id).values(state=state.value))
    db.commit()
    return bool(done.rowcount)  # type: ignore[attr-defined]


def seen_state(row: HostRow, lost_after_s: float, now: datetime | None = None) -> HostState:
    """The host's state as it reads now: its own, unless it has been silent too long."""
    if row.last_seen < (now or utcnow()) - timedelta(seconds=lost_after_s):
        return HostState.lost
    return row.state


def listing(db: Session) -> list[HostRow]:
    return list(db.exec(select(HostRow).order_by(col(HostRow.id))))


def state_of(db: Session, host_id: str, lost_after_s: float) -> HostState | None:
    """The host's state as it reads now; None when it never registered."""
    row = db.get(HostRow, host_id)
    return None if row is None else seen_state(row, lost_after_s)
