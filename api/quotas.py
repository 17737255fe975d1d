"""Per-user limits: the settings' values, or an admin's for one user (``user_limits``), and
the check of kept disks (count and bytes) before a session ends keeping its disk. A refusal
is a problem document naming the limit, its value, what is used of it and, where it frees
by itself, when (the oldest kept disk's removal past the age limit)."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from api.deps import Problem
from api.problems import LimitOut
from api.schemas import UserLimitsIn, UserLimitsOut
from config.settings import Settings
from sandboxes.kept import kept_until
from store.kept import kept_by
from store.models import User, UserLimits, utcnow

NAMES = ("spend_day_usd", "spend_month_usd", "kept_disks", "kept_bytes")
# The settings each override stands for.
SETTINGS = {
    "spend_day_usd": "spend_day_usd",
    "spend_month_usd": "spend_month_usd",
    "kept_disks": "kept_disks_per_user",
    "kept_bytes": "kept_bytes_per_user",
}


def limits_of(db: Session, settings: Settings, user_id: str) -> UserLimitsOut:
    """The user's limits: each the admin's override if set, else the setting (0: none)."""
    row = db.get(UserLimits, user_id)
    chosen = UserLimitsIn.model_validate(row, from_attributes=True) if row else UserLimitsIn()
    effective = {
        name: getattr(chosen, name)
        if getattr(chosen, name) is not None
        else getattr(settings, SETTINGS[name])
        for name in NAMES
    }
    return UserLimitsOut(user_id=user_id, overrides=chosen, **effective)


def set_limits(db: Session, user_id: str, wanted: UserLimitsIn) -> None:
    row = db.get(UserLimits, user_id) or UserLimits(user_id=user_id)
    row.sqlmodel_update(wanted.model_dump())
    row.updated_at = utcnow()
    db.add(row)
    db.commit()


def check_kept(db: Session, settings: Settings, user: User) -> None:
    """429 if one more kept disk would pass the user's count, or their kept disks already
    take their bytes (the new one's size is known only once kept)."""
    limits = limits_of(db, settings, user.id)
    kept = kept_by(db, user.id)
    count, size = kept.disks, kept.bytes
    frees = kept_until(kept.oldest, settings.kept_max_age_days)
    if limits.kept_disks and count >= limits.kept_disks:
        raise _refusal(
            f"you keep {count} disks, the most allowed", "kept_disks_per_user",
            limits.kept_disks, "disks", count, frees,
        )  # fmt: skip
    if limits.kept_bytes and size >= limits.kept_bytes:
        raise _refusal(
            f"your kept disks take {size} bytes, the limit is {limits.kept_bytes}",
            "kept_bytes_per_user", limits.kept_bytes, "bytes", size, frees,
        )  # fmt: skip


def _refusal(
    said: str, name: str, value: float, unit: str, used: float, frees: datetime | None
) -> Problem:
    when = (
        f"; the oldest is removed at {frees.isoformat().replace('+00:00', 'Z')}"
        if frees is not None
        else ""
    )
    detail = (
        f"{said} (BERTH_{name.upper()}, or an admin's limit for you): end the session without "
        f"keeping its disk, or resume a kept one and end it without keeping{when}"
    )
    limit = LimitOut(name=name, value=value, unit=unit, used=used, resets_at=frees)
    return Problem(429, detail, limit=limit)
