"""Event streams open on every API process, counted per user in the database (a lease per
open stream), so a user holds at most so many whichever replicas their streams are on."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, insert, select
from sqlmodel import Session

from store.db import take_turn
from store.models import StreamLease, utcnow

TABLE = StreamLease.__table__  # type: ignore[attr-defined]
# A lease older than a stream may live, and this, belongs to a process that died with the
# stream open: it no longer counts.
STALE_AFTER = timedelta(minutes=1)


def open_lease(db: Session, user_id: str, most: int, lifetime_s: float) -> int | None:
    """A lease for one more of the user's streams, or None if they have ``most`` open:
    counted and taken in one turn of the user's, so streams asked for at once on any
    number of processes get no more than ``most``."""
    take_turn(db, f"streams:{user_id}")
    mine = TABLE.c.user_id == user_id
    stale = utcnow() - timedelta(seconds=lifetime_s) - STALE_AFTER
    db.execute(delete(TABLE).where(mine, TABLE.c.created_at < stale))
    if db.execute(select(func.count()).select_from(TABLE).where(mine)).scalar_one() >= most:
        db.rollback()
        return None
    lease: int = db.execute(
        insert(TABLE).values(user_id=user_id, created_at=utcnow()).returning(TABLE.c.id)
    ).scalar_one()
    db.commit()
    return lease


def close_lease(db: Session, lease: int) -> None:
    db.execute(delete(TABLE).where(TABLE.c.id == lease))
    db.commit()
