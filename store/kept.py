"""What a user keeps on the hosts' disks: their preserved sessions' disks (counted, and in
bytes) and their checkpoints' machine states (in bytes), against their limits. Asked by the
API before it keeps more, and by a host before it saves a checkpoint the session took by
itself (no API call stands before that one)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from store.models import CheckpointRow, SandboxRow, SessionRow, UserLimits


@dataclass(frozen=True)
class Kept:
    disks: int  # preserved sessions' disks
    bytes: int  # those disks and every checkpoint
    oldest: datetime | None  # when the oldest kept disk's session ended


def kept_by(db: Session, user_id: str) -> Kept:
    disks, size, oldest = db.exec(
        select(
            func.count(),
            func.coalesce(func.sum(SandboxRow.kept_bytes), 0),
            func.min(SessionRow.ended_at),
        )
        .select_from(SandboxRow)
        .join(SessionRow, col(SessionRow.id) == col(SandboxRow.session_id))
        .where(
            SessionRow.user_id == user_id,
            SandboxRow.status == "preserved",
            col(SessionRow.preserved),
        )
    ).one()
    # Checkpoints' machine states are kept disk too (counted in bytes, not in disks).
    size = (
        int(size or 0)
        + db.exec(
            select(func.coalesce(func.sum(CheckpointRow.size_bytes), 0)).where(
                CheckpointRow.user_id == user_id
            )
        ).one()
    )
    return Kept(disks=int(disks), bytes=size, oldest=oldest)


def bytes_limit(db: Session, user_id: str, default: int) -> int:
    """The user's kept-bytes limit: an admin's override, else ``default`` (0: none)."""
    row = db.get(UserLimits, user_id)
    return row.kept_bytes if row is not None and row.kept_bytes is not None else default


def over_bytes(db: Session, session_id: str, default: int) -> str | None:
    """Why the user of ``session_id`` may keep nothing more (their kept bytes are at their
    limit), or None."""
    row = db.get(SessionRow, session_id)
    if row is None:
        return None
    limit = bytes_limit(db, row.user_id, default)
    used = kept_by(db, row.user_id).bytes
    if limit and used >= limit:
        return (
            f"the user's kept disks and checkpoints take {used} bytes, the limit is {limit} "
            "(BERTH_KEPT_BYTES_PER_USER)"
        )
    return None
