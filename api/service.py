"""What a user can do, shared by the JSON API and the dashboard.

A session is a row plus a SessionWorkflow; everything that changes a running session is a
Temporal update on that workflow, whose validators say no with a reason the user sees.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlmodel import Session, col, func, or_, select
from sqlmodel.sql.expression import SelectOfScalar
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

import vm_templates
from api.deps import Problem, TemporalLink
from api.schemas import SessionOut, StepOut, TaskOut, TaskRefOut
from berth.settings import Settings
from llm.accounting import task_usage
from store import audit
from store.artifacts import ArtifactStore
from store.models import ArtifactRow, SessionRow, SessionStatus, StepRow, TaskRow, User, utcnow
from workflows.models import SessionInput, TaskRef
from workflows.session import SessionWorkflow, workflow_id

log = logging.getLogger("berth.api")


async def start_session(
    db: Session,
    temporal: TemporalLink,
    settings: Settings,
    user: User,
    template: str,
    ip: str | None = None,
) -> SessionRow:
    if template not in vm_templates.names():
        known = ", ".join(vm_templates.names())
        raise Problem(422, f"no sandbox template {template!r}; known: {known}")
    live = db.exec(
        select(func.count())
        .select_from(SessionRow)
        .where(SessionRow.user_id == user.id, col(SessionRow.ended_at).is_(None))
    ).one()
    if live >= settings.max_live_sessions:
        raise Problem(
            429,
            f"you have {live} live sessions, the most allowed (BERTH_MAX_LIVE_SESSIONS); "
            "end one first",
        )
    client = await temporal.client()  # before the row: no session is left half-made
    row = SessionRow(user_id=user.id, template=template)
    db.add(row)
    db.commit()
    db.refresh(row)
    audit.record(db, user.id, "session.create", row.id, {"template": template}, ip=ip)
    try:
        await client.start_workflow(
            SessionWorkflow.run,
            SessionInput(
                session_id=row.id,
                template=template,
                host_task_queue=settings.host_task_queue,
                warm_pool=settings.warm_pool,
                idle_timeout_s=settings.session_idle_timeout_s,
                hibernate_after_s=settings.session_hibernate_after_s,
                step_timeout_s=settings.step_timeout_s,
                max_steps=settings.agent_max_steps,
                max_revisions=settings.agent_max_revisions,
            ),
            id=workflow_id(row.id),
            task_queue=settings.host_task_queue,  # the session lives on its host
            # The user's id, not their email: operators see summaries, and so do logs.
            static_summary=f"session of user {user.id} ({template})",
        )
    except RPCError as exc:
        row.status, row.error = SessionStatus.failed, f"could not start: {exc.message}"
        row.ended_at = utcnow()
        db.add(row)
        db.commit()
        raise _unavailable(exc) from exc
    return row


def list_sessions(
    db: Session, user: User | None, limit: int, after: tuple[datetime, str] | None = None
) -> list[SessionRow]:
    """Newest first; ``user`` None lists everyone's (admins); ``after`` is the
    (created_at, id) of the last row of the previous page."""
    query = select(SessionRow)
    if user is not None:
        query = query.where(SessionRow.user_id == user.id)
    return list(db.exec(_keyset(query, SessionRow, after, newest_first=True).limit(limit)))


T = TypeVar("T", SessionRow, TaskRow)


def _keyset(
    query: SelectOfScalar[T], table: type[T], after: tuple[datetime, str] | None, newest_first: bool
) -> SelectOfScalar[T]:
    """Rows past ``after`` in (created_at, id) order: a page that does not shift as rows come."""
    created, row_id = col(table.created_at), col(table.id)
    if after is not None:
        moment, last = after
        if newest_first:
            query = query.where(or_(created < moment, (created == moment) & (row_id < last)))
        else:
            query = query.where(or_(created > moment, (created == moment) & (row_id > last)))
    if newest_first:
        return query.order_by(created.desc(), row_id.desc())
    return query.order_by(created, row_id)


def own_session(db: Session, user: User, session_id: str) -> SessionRow:
    """A session the user may change: their own."""
    row = db.get(SessionRow, session_id)
    if row is None or row.user_id != user.id:
        raise Problem(404, f"no session {session_id}")
    return row


def visible_session(db: Session, user: User, session_id: str) -> SessionRow:
    """A session the user may read: their own, or any for an admin."""
    row = db.get(SessionRow, session_id)
    if row is None or not (row.user_id == user.id or user.is_admin):
        raise Problem(404, f"no session {session_id}")
    return row


def session_out(row: SessionRow) -> SessionOut:
    return SessionOut(
        id=row.id,
        status=row.status,
        template=row.template,
        error=row.error,
        created_at=row.created_at,
        ended_at=row.ended_at,
        events_url=f"/api/sessions/{row.id}/events",
    )


async def end_session(
    db: Session, temporal: TemporalLink, user: User, row: SessionRow, ip: str | None = None
) -> None:
    try:
        await (await temporal.client()).get_workflow_handle(workflow_id(row.id)).cancel()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise _unavailable(exc) from exc
        # Already over: ending it again is not an error.
    audit.record(db, user.id, "session.delete", row.id, ip=ip)


def _unavailable(exc: RPCError) -> Problem:
    # Temporal's message may name internal addresses: it goes to the log only.
    log.warning("Temporal refused a call: %s", exc.message)
    return Problem(503, "the orchestrator is unavailable; try again")


def idempotency_id(header: str) -> str:
    """A client's Idempotency-Key as the workflow keeps it: short and of fixed size."""
    return hashlib.sha256(header.encode()).hexdigest()[:32]


async def update(
    temporal: TemporalLink,
    row: SessionRow,
    name: str,
    argument: BaseModel,
    idempotency_key: str | None = None,
) -> TaskRefOut:
    """Run one of the workflow's updates; a validator's refusal becomes a 409. Temporal
    runs an update once per id within a run, so a retried request with the same key gets
    the first answer (across runs, the workflow itself remembers submissions' keys)."""
    if row.status in (SessionStatus.ended, SessionStatus.failed):
        raise Problem(409, f"session {row.id} has {row.status}")
    handle = (await temporal.client()).get_workflow_handle(workflow_id(row.id))
    update_id = f"{name}-{idempotency_key}" if idempotency_key else None
    try:
        ref: Any = await handle.execute_update(name, argument, id=update_id, result_type=TaskRef)
    except WorkflowUpdateFailedError as exc:
        # The validator's words, without Temporal's wrapping.
        raise Problem(409, str(exc.cause or exc)) from exc
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise Problem(409, f"session {row.id} has ended") from exc
        raise _unavailable(exc) from exc
    return TaskRefOut(id=ref.id, status=ref.status)


def task_out(db: Session, session_id: str, task_id: str) -> TaskOut:
    task = db.get(TaskRow, task_id)
    if task is None or task.session_id != session_id:
        raise Problem(404, f"no task {task_id} in session {session_id}")
    steps = db.exec(select(StepRow).where(StepRow.task_id == task.id).order_by(col(StepRow.index)))
    return TaskOut(
        id=task.id,
        session_id=task.session_id,
        prompt=task.prompt,
        status=task.status,
        result=task.result,
        error=task.error,
        created_at=task.created_at,
        steps=[StepOut.model_validate(step, from_attributes=True) for step in steps],
        llm=task_usage(db, task.id),
    )


def list_tasks(
    db: Session, session_id: str, limit: int, after: tuple[datetime, str] | None
) -> list[TaskRow]:
    query = select(TaskRow).where(TaskRow.session_id == session_id)
    return list(db.exec(_keyset(query, TaskRow, after, newest_first=False).limit(limit)))


def artifact_file(
    db: Session, settings: Settings, row: SessionRow, artifact_id: str
) -> tuple[ArtifactRow, Path]:
    """An artifact of the session (its row and file), or a 404."""
    store = ArtifactStore(settings.artifacts_dir, settings.artifact_max_bytes)
    try:
        return store.find(db, row.id, artifact_id)
    except LookupError:
        raise Problem(404, f"no artifact {artifact_id[:80]} in session {row.id}") from None
