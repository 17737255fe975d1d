"""Attempt counters with lockouts, kept in the database so that every API process counts
the same attempts (the API is stateless). A counter counts within a fixed window; a locked
key refuses until its lock ends."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import case, delete, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from store.models import AuthCounter, utcnow

TABLE = AuthCounter.__table__  # type: ignore[attr-defined]


class Counted(NamedTuple):
    """An attempt as its own statement saw the key: its number in the window, and the lock
    in force when it was counted (None if none)."""

    attempts: int
    locked_until: datetime | None


def count(db: Session, key: str, window_s: int) -> Counted:
    """One more attempt under ``key``: how many there have been in the current window, and
    whether the key was locked at that moment. One statement, so concurrent attempts from
    several processes are all counted, and each is judged by what it saw, not by a lock
    that a later attempt set after it (that one would refuse an attempt within the limit).
    Attempts while locked are not counted: the count starts afresh when the lock ends."""
    now = utcnow()
    moment = literal(now, TABLE.c.window_start.type)
    stale = TABLE.c.window_start < literal(now - timedelta(seconds=window_s), moment.type)
    locked = TABLE.c.locked_until > moment
    insert = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(TABLE)
        .values(key=key, count=1, window_start=now)
        .on_conflict_do_update(
            index_elements=[TABLE.c.key],
            set_={
                "count": case((locked, TABLE.c.count), (stale, 1), else_=TABLE.c.count + 1),
                "window_start": case(
                    (locked, TABLE.c.window_start), (stale, moment), else_=TABLE.c.window_start
                ),
            },
        )
        .returning(TABLE.c.count, TABLE.c.locked_until)
    )
    attempts, until = db.execute(statement).one()
    db.commit()
    return Counted(int(attempts), until if until is not None and until > now else None)


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
