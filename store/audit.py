"""The audit log: who did what, when, from where. Rows are only ever added (the database
refuses updates and deletes of ``audit_log``)."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from store.models import AuditEntry


def record(
    db: Session,
    actor_id: str | None,
    action: str,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
    ip: str | None = None,
) -> AuditEntry:
    """Append one entry and commit it, so it stays even if the caller then fails."""
    entry = AuditEntry(actor_id=actor_id, action=action, target=target, detail=detail or {}, ip=ip)
    db.add(entry)
    db.commit()
    return entry


def newest(db: Session, limit: int) -> list[AuditEntry]:
    query = select(AuditEntry).order_by(col(AuditEntry.at).desc(), col(AuditEntry.id).desc())
    return list(db.exec(query.limit(limit)))
