"""Checkpoints of a session, rolling back to one, and forking sessions from one: shared by
the JSON API and the dashboard. Taking, rolling back and deleting are updates of the
session's workflow (ordered with its tasks); a fork is a new session whose first machine
is made from the checkpoint, its log beginning with ``session.forked_from``."""

from __future__ import annotations

from sqlmodel import Session, col, select

from api import quotas, service
from api.deps import Problem, TemporalLink
from api.schemas import CheckpointOut
from config.settings import Settings
from store import audit, events
from store.events import EventType
from store.models import CheckpointRow, SessionRow, User
from workflows.models import (
    CheckpointAsk,
    CheckpointControl,
    CheckpointRef,
    RollbackAsk,
    RollbackRef,
)

NO_MEMORY = "this sandbox's memory cannot be kept (Docker mode keeps the workspace only)"


def checkpoint_out(row: CheckpointRow, note: str | None = None) -> CheckpointOut:
    return CheckpointOut(
        id=row.id, session_id=row.session_id, label=row.label, memory=row.memory, note=note,
        size_bytes=row.size_bytes, seq=row.seq, created_at=row.created_at,
    )  # fmt: skip


def listed(db: Session, session_id: str) -> list[CheckpointRow]:
    return list(
        db.exec(
            select(CheckpointRow)
            .where(CheckpointRow.session_id == session_id)
            .order_by(col(CheckpointRow.seq))
        )
    )


def find(db: Session, row: SessionRow, checkpoint_id: str) -> CheckpointRow:
    found = db.get(CheckpointRow, checkpoint_id)
    if found is None or found.session_id != row.id:
        raise Problem(404, f"no checkpoint {checkpoint_id} in session {row.id}")
    return found


async def create(
    db: Session,
    temporal: TemporalLink,
    settings: Settings,
    user: User,
    row: SessionRow,
    ask: CheckpointAsk,
) -> CheckpointOut:
    """Take a checkpoint between steps (429 past the user's kept bytes)."""
    quotas.check_kept(db, settings, user)
    ref = await service.call_update(temporal, row, "checkpoint", ask, CheckpointRef)
    db.expire_all()  # written by the workflow's progress, in another transaction
    note = NO_MEMORY if ask.memory and not ref.memory else None
    return checkpoint_out(find(db, row, ref.id), note)


async def delete(db: Session, temporal: TemporalLink, row: SessionRow, checkpoint_id: str) -> None:
    find(db, row, checkpoint_id)
    control = CheckpointControl(checkpoint_id=checkpoint_id)
    await service.call_update(temporal, row, "delete_checkpoint", control, type(None))


async def rollback(
    db: Session, temporal: TemporalLink, row: SessionRow, checkpoint_id: str
) -> RollbackRef:
    """Stop the running task, put the machine back to the checkpoint, and mark the tasks
    run since rolled back."""
    found = find(db, row, checkpoint_id)
    state = found.state
    running = state.get("running")
    # Those the session had finished or queued then: the one running then is undone too.
    before = [*state.get("finished", {})] + [
        t["id"] for t in state.get("tasks", []) if t["id"] != running
    ]
    ask = RollbackAsk(checkpoint_id=checkpoint_id, tasks_before=before)
    return await service.call_update(temporal, row, "rollback", ask, RollbackRef)


async def fork(
    db: Session,
    temporal: TemporalLink,
    settings: Settings,
    user: User,
    row: SessionRow,
    checkpoint_id: str,
    count: int,
    ip: str | None = None,
) -> list[SessionRow]:
    """``count`` new sessions of the user, each on its own machine made from the
    checkpoint; each one's log begins by naming its parent and the checkpoint."""
    if count > settings.fork_max_count:
        raise Problem(
            422, f"at most {settings.fork_max_count} forks at once (BERTH_FORK_MAX_COUNT)"
        )
    found = find(db, row, checkpoint_id)
    client = await temporal.client()
    searchable = await temporal.searchable()
    forks = []
    for _ in range(count):
        # The checkpoint is kept by the host its session ran on: its forks are made there.
        placed = service.place_session(
            db, settings, row.template, keeper=found.sandbox.get("host_id"), keeper_only=True
        )
        child = SessionRow(
            user_id=user.id, template=row.template, idle_timeout_s=row.idle_timeout_s,
            hibernate_after_s=row.hibernate_after_s, model=row.model,
            auto_checkpoint=row.auto_checkpoint, parent_id=row.id,
            parent_checkpoint_id=found.id,
        )  # fmt: skip
        service.admit_live(db, settings, user, child)
        events.record(
            db, child.id, EventType.session_forked_from,
            {"parent_id": row.id, "checkpoint_id": found.id, "seq": found.seq},
        )  # fmt: skip
        audit.record(db, user.id, "session.fork", child.id, {"checkpoint": found.id}, ip=ip)
        await service.start_run(
            db, client, settings, user, child, placed, searchable=searchable, fork=found.id
        )
        forks.append(child)
    return forks
