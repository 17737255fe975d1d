"""Attempt counters with lockouts, kept in the database so that every API process counts
the same attempts (the API is stateless). A counter counts within a fixed window; a locked
key refuses until its lock ends."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import case, delete, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from store.models import AuthCounter, utcnow

TABLE = AuthCounter.__table__  # type: ignore[attr-defined]


def count(db: Session, key: str, window_s: int) -> int:
    """One more attempt under ``key``; how many there have been in the current window.
    One statement, so concurrent attempts from several processes are all counted."""
    now = utcnow()
    moment = literal(now, TABLE.c.window_start.type)
    stale = TABLE.c.window_start < literal(now - timedelta(seconds=window_s), moment.type)
    insert = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(TABLE)
        .values(key=key, count=1, window_start=now)
        .on_conflict_do_update(
            index_elements=[TABLE.c.key],
            set_={
                "count": case((stale, 1), else_=TABLE.c.count + 1),
                "window_start": case((stale, moment), else_=TABLE.c.window_start),
            },
        )
        .returning(TABLE.c.count)
    )
    attempts = int(db.execute(statement).scalar_one())
    db.commit()
    return attempts


def locked_until(db: Session, *keys: str) -> datetime | None:
    """When the latest lock among ``keys`` ends; None if none is locked now."""
    query = select(TABLE.c.locked_until).where(TABLE.c.key.in_(keys))
    ends = [end for end in db.execute(query).scalars() if end is not None and end > utcnow()]
    return max(ends, default=None)


def lock(db: Session, key: str, lockout_s: int) -> datetime:
    """Lock ``key`` and start its count afresh for when the lock ends."""
    until = utcnow() + timedelta(seconds=lockout_s)
    db.execute(update(TABLE).where(TABLE.c.key == key).values(locked_until=until, count=0))
    db.commit()
    return until


def clear(db: Session, key: str) -> None:
    db.execute(delete(TABLE).where(TABLE.c.key == key))
    db.commit()
