"""Admin routes: sign-up invites, the host registry, and the audit trail. For one session
the trail merges the audit log's entries about the session with the commands its sandbox ran
(each step's ``step.started`` event), in time order."""

from __future__ import annotations

import heapq
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy import false, true
from sqlmodel import Session, col, or_, select

from api import accounts, cursors, quotas
from api.deps import AdminDep, DbDep, IpDep, Problem, SettingsDep
from api.problems import problems
from api.schemas import HostOut, InviteOut, UserLimitsIn, UserLimitsOut
from config.settings import Settings
from store import audit, hosts
from store.events import EventType
from store.models import AuditEntry, Event, HostState, SessionRow, User

# Every route under /api may be refused for its input; the others are named per route.
router = APIRouter(prefix="/api/admin", tags=["admin"], responses=problems(422))
Kind = Literal["audit", "command"]
Position = tuple[datetime, str, int]  # where a page ends in the merged order


class AuditItem(BaseModel):
    kind: Kind  # an audit log entry, or a command a sandbox ran
    id: int
    at: datetime
    actor_id: str | None
    action: str
    target: str | None
    detail: dict[str, Any]
    ip: str | None = None


@router.post("/invites", status_code=201, responses=problems(401, 403))
def create_invite(
    request: Request, db: DbDep, settings: SettingsDep, admin: AdminDep, ip: IpDep
) -> InviteOut:
    """A single-use sign-up invite, valid for BERTH_INVITE_TTL_HOURS: its link opens the
    dashboard's sign-up with the code filled in (the API takes it as ``invite``). Useful
    when BERTH_SIGNUP=invite; made in any mode."""
    row, code = accounts.make_invite(db, settings, admin, ip)
    link = str(request.base_url.replace(path="/login").include_query_params(invite=code))
    return InviteOut(code=code, link=link, expires_at=row.expires_at)


@router.get("/users/{user_id}/limits", responses=problems(401, 403, 404))
def get_limits(user_id: str, db: DbDep, settings: SettingsDep, admin: AdminDep) -> UserLimitsOut:
    """A user's limits in force (LLM spending a day and a month, kept disks), and the
    overrides an admin set (null: the setting's)."""
    _user(db, user_id)
    return quotas.limits_of(db, settings, user_id)


@router.put("/users/{user_id}/limits", responses=problems(401, 403, 404))
def put_limits(
    user_id: str,
    body: UserLimitsIn,
    db: DbDep,
    settings: SettingsDep,
    admin: AdminDep,
    ip: IpDep,
) -> UserLimitsOut:
    """Sets a user's limits in place of the settings' (a field null or left out: the
    setting's; 0: no limit). They apply from the next model call or kept disk."""
    _user(db, user_id)
    quotas.set_limits(db, user_id, body)
    audit.record(db, admin.id, "admin.limits.update", user_id, body.model_dump(), ip=ip)
    return quotas.limits_of(db, settings, user_id)


def _user(db: Session, user_id: str) -> User:
    found = db.get(User, user_id)
    if found is None:
        raise Problem(404, f"no user {user_id}")
    return found


def host_list(db: Session, settings: Settings) -> list[HostOut]:
    """Every registered host, each in the state it reads in now."""
    lost_after = settings.host_lost_after_s
    return [
        HostOut(**row.model_dump(exclude={"state"}), state=hosts.seen_state(row, lost_after))
        for row in hosts.listing(db)
    ]


class HostStateIn(BaseModel):
    # An operator's state: lost is read from a host's silence, never set.
    state: Literal[HostState.active, HostState.draining]


def set_host_state(db: Session, user: User, host_id: str, state: HostState, ip: str | None) -> None:
    """Drain a host (no new sessions there, its warm pools ended on its next heartbeat) or
    undrain it, as ``python -m berth host drain|undrain`` does; 404 for an unknown host."""
    if not hosts.set_state(db, host_id, state):
        raise Problem(404, f"no host {host_id!r} in the registry")
    action = "host.drain" if state == HostState.draining else "host.undrain"
    audit.record(db, user.id, action, host_id, ip=ip)


@router.put("/hosts/{host_id}/state", status_code=204, responses=problems(401, 403, 404))
def put_host_state(
    host_id: str, change: HostStateIn, db: DbDep, admin: AdminDep, ip: IpDep
) -> None:
    """Drain (``draining``) or undrain (``active``) a sandbox host."""
    set_host_state(db, admin, host_id, change.state, ip)


@router.get("/hosts", responses=problems(401, 403))
def host_registry(db: DbDep, settings: SettingsDep, admin: AdminDep) -> list[HostOut]:
    """The sandbox hosts: what each can hold and holds (machines, warm pools per template),
    as of its last heartbeat, and its state (active, draining, or lost: silent for longer
    than BERTH_HOST_LOST_AFTER_S)."""
    return host_list(db, settings)


def _entries(
    db: Session, session_id: str | None, after: Position | None, n: int
) -> list[AuditItem]:
    query = select(AuditEntry)
    if session_id is not None:
        query = query.where(AuditEntry.target == session_id)
    query = _after(query, AuditEntry, "audit", after)
    rows = db.exec(query.order_by(col(AuditEntry.at), col(AuditEntry.id)).limit(n))
    return [AuditItem(kind="audit", **row.model_dump()) for row in rows]


def _commands(db: Session, row: SessionRow, after: Position | None, n: int) -> list[AuditItem]:
    query = select(Event).where(Event.session_id == row.id, Event.type == EventType.step_started)
    query = _after(query, Event, "command", after)
    events = db.exec(query.order_by(col(Event.created_at), col(Event.id)).limit(n))
    return [
        AuditItem(
            kind="command",
            id=event.id or 0,
            at=event.created_at,
            actor_id=row.user_id,
            action="command",
            target=row.id,
            detail={
                "task_id": event.data.get("task_id"),
                "index": event.data.get("index"),
                "command": event.data.get("step", {}).get("command"),
            },
        )
        for event in events
    ]


def _after(query: Any, table: Any, kind: Kind, after: Position | None) -> Any:
    """Rows past ``after`` in the merged order (time, kind, id)."""
    if after is None:
        return query
    moment, last_kind, last_id = after
    at = col(table.at) if table is AuditEntry else col(table.created_at)
    # Equal times: the other kind's rows come wholly before or after; the same kind's by id.
    later_kind = true() if kind > last_kind else false()
    tie = col(table.id) > last_id if kind == last_kind else later_kind
    return query.where(or_(at > moment, (at == moment) & tie))


def _position(cursor: str) -> Position:
    moment, ident = cursors.decode_moment(cursor)
    kind, _, number = ident.partition(":")
    if kind not in ("audit", "command") or not number.isdigit():
        raise Problem(400, "invalid cursor: pass the one from a Link header as it is")
    return moment, kind, int(number)


@router.get("/audit", responses={**problems(400, 401, 403, 404)})
def audit_trail(
    db: DbDep,
    admin: AdminDep,
    ip: IpDep,
    page: cursors.PagingDep,
    session_id: Annotated[str | None, Query(max_length=64)] = None,
) -> list[AuditItem]:
    """The audit log, oldest first; with ``session_id``, that session's trail: its audit
    entries and every command its sandbox ran. Reading it is itself audited."""
    after = _position(page.cursor) if page.cursor else None
    items = _entries(db, session_id, after, page.fetch)
    if session_id is not None:
        row = db.get(SessionRow, session_id)
        if row is None:
            raise Problem(404, f"no session {session_id}")
        merged = heapq.merge(items, _commands(db, row, after, page.fetch), key=_order)
        items = list(merged)[: page.fetch]
    # Not targeted at the session: its trail would grow with every read of it.
    audit.record(db, admin.id, "admin.audit.read", detail={"session_id": session_id}, ip=ip)
    return page.take(items, _cursor_of)


def _order(item: AuditItem) -> tuple[datetime, str, int]:
    return item.at, item.kind, item.id


def _cursor_of(item: AuditItem) -> tuple[str, str]:
    return item.at.isoformat(), f"{item.kind}:{item.id}"
